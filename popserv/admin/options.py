"""Command-line options made from the settings' declarations, as twistd's are."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from popserv.admin.common import (
    EX_USAGE,
    AdminError,
)

__all__ = ["addSettings", "givenSettings", "positive", "schemeNames"]


def addSettings(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """
    Options for settings, made from their declarations: C{names} only, or
    every setting C{twistd popserv} takes. Absent options set nothing, so
    they may be given before or after a command's name.
    """
    from popserv.settings import BOOL, LIST

    parser.add_argument(
        "--config", "-c", default=argparse.SUPPRESS, help="the server's TOML configuration file"
    )
    if names is None:
        from popserv.tap import commandLineSettings

        settings = [s for s, _ in commandLineSettings()]
    else:
        from popserv.config import SETTINGS

        settings = [s for s in SETTINGS if s.name in names]
    for declared in settings:
        spellings = [f"--{declared.option}", *(f"--{a}" for a in declared.optionAliases)]
        if declared.short:
            spellings.append(f"-{declared.short}")
        common = dict(dest=declared.name, default=argparse.SUPPRESS)
        helpText = declared.describe().replace("%", "%%")
        if declared.kind == BOOL:
            parser.add_argument(*spellings, action="store_true", help=helpText, **common)
            parser.add_argument(
                f"--no-{declared.option}",
                action="store_false",
                help=f"the opposite of --{declared.option}",
                **common,
            )
        else:
            action = "append" if declared.kind == LIST else "store"
            metavar = declared.metavar or declared.kind.upper()
            parser.add_argument(
                *spellings, action=action, metavar=metavar, help=helpText, **common
            )


def givenSettings(args: argparse.Namespace) -> dict[str, object]:
    """The settings given on the command line, converted as their declarations say."""
    from popserv.settings import LIST, SettingError
    from popserv.tap import commandLineSettings

    given: dict[str, object] = {}
    for declared, _ in commandLineSettings():
        if not hasattr(args, declared.name):
            continue
        raw = getattr(args, declared.name)
        try:
            if isinstance(raw, bool):
                given[declared.name] = raw
            elif declared.kind == LIST:
                given[declared.name] = tuple(v for r in raw for v in declared.fromText(r))
            else:
                given[declared.name] = declared.fromText(raw)
        except SettingError as e:
            raise AdminError(f"--{declared.option}: {e}", EX_USAGE) from None
    return given


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a number of workers, 1 or more, not {text!r}")
    return int(text)


def schemeNames() -> str:
    from popserv.auth.schemes import HASHING_SCHEMES

    return ", ".join(HASHING_SCHEMES)
