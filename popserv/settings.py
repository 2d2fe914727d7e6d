"""
How a setting is declared: once, with everything the command lines, the
configuration file, C{check-config} and the documentation need to know.

L{popserv.config.Config} declares popserv's own settings on its fields
(L{setting}); a plugin declares its options as L{Setting}s. Everything else
is derived: the twistd options (L{popserv.tap}), C{popserv serve}'s options,
the TOML keys and the settings reference in the documentation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Setting", "setting", "SettingError", "BOOL", "INT", "STR", "LIST", "DAYS"]

#: The kinds of value a setting holds.
BOOL, INT, STR, LIST, DAYS = "bool", "int", "str", "list", "days"

_FALSE = frozenset({"no", "false", "off", "0"})
_TRUE = frozenset({"yes", "true", "on", "1"})


class SettingError(ValueError):
    """A value a setting cannot take; the message says why (without the setting's name)."""


@dataclass(frozen=True)
class Setting:
    """
    One setting.

    @ivar name: the canonical name: the configuration key, and with C{-} for
        C{_} the long option (C{max_connections}, C{--max-connections}).
    @ivar kind: L{BOOL}, L{INT}, L{STR}, L{LIST} (of strings; the option is
        repeatable) or L{DAYS} (a number of days or C{NEVER}).
    @ivar help: one or two sentences; C{{choices}} in it is replaced by the
        choices, which may come from a registry at the time help is shown.
    @ivar short: a one-letter option, if any.
    @ivar aliases: other long options (and configuration keys) already in use.
    @ivar choices: the allowed values, or a callable giving them.
    @ivar mentions: values the help lists without limiting the setting to
        them (the kinds of a C{KIND:ARGS} setting), or a callable giving them.
    @ivar split: for L{LIST}: a separator that also splits one option's value.
    @ivar defaultText: how to describe the default when its value does not
        say it well (C{"this host's name"}).
    @ivar perUser: whether a user database (a passwd-file line's extra
        fields, a directory attribute) may set its own value per user.
    @ivar check: raises ValueError for a value that cannot work.
    @ivar metavar: what the option's value is called in help.
    """

    name: str
    kind: str
    default: Any
    help: str
    short: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | Callable[[], Iterable[str]] | None = None
    mentions: tuple[str, ...] | Callable[[], Iterable[str]] | None = None
    split: str | None = None
    defaultText: str | None = None
    perUser: bool = False
    check: Callable[[Any], None] | None = field(default=None, compare=False)
    metavar: str | None = None

    @property
    def option(self) -> str:
        """The canonical long option, without dashes in front."""
        return self.name.replace("_", "-")

    @property
    def optionAliases(self) -> tuple[str, ...]:
        return tuple(alias.replace("_", "-") for alias in self.aliases)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every spelling accepted as a configuration key."""
        spellings = [self.name, self.option]
        for alias in self.aliases:
            spellings += [alias.replace("-", "_"), alias.replace("_", "-")]
        return tuple(dict.fromkeys(spellings))

    def allowedChoices(self) -> tuple[str, ...] | None:
        return _values(self.choices)

    def describe(self) -> str:
        """The help text with its choices and its default filled in."""
        choices = self.allowedChoices()
        text = self.help
        if "{choices}" in text:
            text = text.replace("{choices}", ", ".join(choices or _values(self.mentions) or ()))
        elif choices:
            text = f"{text} One of: {', '.join(choices)}."
        default = self.defaultDescription()
        if default:
            text = f"{text} [default: {default}]"
        if self.perUser:
            text += " (per user too)"
        return text

    def defaultDescription(self) -> str:
        if self.defaultText is not None:
            return self.defaultText
        value = self.default
        if value is None or value == () or value is False:
            return "" if self.kind != BOOL else "no"
        if value is True:
            return "yes"
        if isinstance(value, tuple):
            return ", ".join(map(str, value))
        return str(value)

    def toArgs(self, value: Any) -> list[str]:
        """The command-line arguments that give this setting C{value}."""
        if self.kind == BOOL:
            return [f"--{self.option}" if value else f"--no-{self.option}"]
        if self.kind == LIST:
            return [arg for item in value for arg in (f"--{self.option}", str(item))]
        return [f"--{self.option}", str(value)]

    def fromText(self, text: str) -> Any:
        """A value from a command line (one occurrence, for L{LIST}: a list)."""
        if self.kind == BOOL:
            word = text.strip().lower()
            if word in _TRUE:
                return self._checked(True)
            if word in _FALSE:
                return self._checked(False)
            raise SettingError(f"yes or no, not {text!r}")
        if self.kind == INT:
            try:
                number = int(text)
            except ValueError:
                raise SettingError(f"a whole number, not {text!r}") from None
            return self._checked(number)
        if self.kind == LIST:
            parts = text.split(self.split) if self.split else [text]
            return self._checked(tuple(p.strip() for p in parts if p.strip()))
        if self.kind == DAYS:
            return self._checked(_days(text))
        return self._checked(text)

    def fromFile(self, value: Any) -> Any:
        """
        A value from the configuration file, type-checked and normalized; its
        checks run when the configuration is validated, so reading a file
        (as C{popserv deliver} does) loads no registry.
        """
        kind = self.kind
        if kind == BOOL and isinstance(value, bool):
            return value
        if kind == INT and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == STR and isinstance(value, str):
            return value
        if kind == DAYS and isinstance(value, (str, int)) and not isinstance(value, bool):
            return _days(value)
        if kind == LIST:
            items = [value] if isinstance(value, str) else value
            if isinstance(items, list) and all(isinstance(v, str) for v in items):
                if self.split:
                    items = [p.strip() for v in items for p in v.split(self.split) if p.strip()]
                return tuple(items)
            raise SettingError("must be a list of strings")
        raise SettingError("has the wrong type")

    def _checked(self, value: Any) -> Any:
        self.validate(value)
        return value

    def validate(self, value: Any) -> None:
        """Raise L{SettingError} if C{value} cannot work."""
        if value is None:
            return
        choices = self.allowedChoices()
        if choices is not None and self.kind != LIST and value not in choices:
            raise SettingError(f"one of {', '.join(choices)}, not {value!r}")
        if self.check is not None:
            try:
                self.check(value)
            except SettingError:
                raise
            except ValueError as e:
                raise SettingError(str(e)) from None


def _days(value: str | int) -> str | int:
    """A number of days as an int, C{NEVER} as itself: one value however it was written."""
    if isinstance(value, str):
        if value.strip().upper() == "NEVER":
            return "NEVER"
        if value.strip().isdigit():
            return int(value)
    return value


def _values(
    values: tuple[str, ...] | Callable[[], Iterable[str]] | None,
) -> tuple[str, ...] | None:
    if values is None:
        return None
    return tuple(values() if callable(values) else values)


def setting(default: Any, help: str, kind: str, **declaration: Any) -> Any:
    """
    A dataclass field that is a setting: C{listen: tuple[str, ...] =
    setting(("tcp:110",), "Listen on ...", LIST, short="l")}.
    """
    return field(
        default=default,
        metadata={"setting": dict(declaration, default=default, help=help, kind=kind)},
    )
