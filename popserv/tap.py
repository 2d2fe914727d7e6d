"""
C{twistd popserv}: command-line options only; the building is in L{popserv.service}.

The options are made from the settings' declarations (L{popserv.config.SETTINGS}
and the options of every installed store and auth-source kind), never typed here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from popserv.config import (
    SETTINGS,
    Config,
    ConfigError,
    loadConfig,
    pluginSetting,
    pluginSettings,
)
from popserv.settings import BOOL, LIST, Setting, SettingError

__all__ = [
    "Options",
    "makeService",
    "optionsClass",
    "commandLineSettings",
    "commandLine",
    "buildConfig",
]

_LONGDESC = (
    "Serve POP3 (RFC 1939) to users of an auth source (a passwd-file by default) from "
    "a mail store (Maildirs by default). Settings come from --config (TOML, keys as the "
    "long options, '_' or '-' alike) and are overridden by options given here. "
    "Example: twistd -n popserv --listen tcp:110 --passwd /etc/popserv/passwd "
    "--mail-location 'maildir:/var/mail/%d/%n/Maildir'"
)


def commandLineSettings() -> list[tuple[Setting, bool]]:
    """
    Every setting a command line takes: popserv's own, then each plugin
    kind's (named C{KIND_OPTION}), with whether it is a plugin's.
    """
    found = [(s, False) for s in SETTINGS]
    taken = {spelling for s in SETTINGS for spelling in s.keys}
    for plugin, option in pluginSettings():
        declared = pluginSetting(plugin, option)
        if declared.name in taken:
            raise ConfigError(
                f"the {plugin.name} plugin's option {option.name!r} would be "
                f"--{declared.option}, which is taken"
            )
        taken.add(declared.name)
        found.append((declared, True))
    return found


def commandLine(given: dict[str, Any]) -> list[str]:
    """The options that give these settings (by name), as L{Options} parses them."""
    declared = {s.name: s for s, _ in commandLineSettings()}
    return [arg for name, value in given.items() for arg in declared[name].toArgs(value)]


def _appender(declared: Setting) -> Any:
    def opt(self: usage.Options, value: str) -> None:
        try:
            self.given.setdefault(declared.name, []).extend(declared.fromText(value))
        except SettingError as e:
            raise usage.UsageError(f"--{declared.option}: {e}") from None

    opt.__doc__ = declared.describe()
    return opt


def _flag(declared: Setting, value: bool) -> Any:
    def opt(self: usage.Options) -> None:
        self.given[declared.name] = value

    if value:
        opt.__doc__ = declared.describe()
    else:
        opt.__doc__ = f"The opposite of --{declared.option}."
    return opt


def _parameter(declared: Setting) -> Any:
    def opt(self: usage.Options, value: str) -> None:
        try:
            self.given[declared.name] = declared.fromText(value)
        except SettingError as e:
            raise usage.UsageError(f"--{declared.option}: {e}") from None

    opt.__doc__ = declared.describe()
    return opt


def _alias(handler: Any, declared: Setting) -> Any:
    def opt(self: usage.Options, value: str) -> None:
        handler(self, value)

    opt.__doc__ = f"The same as --{declared.option}."
    return opt


def _methods(settings: Iterable[Setting]) -> dict[str, Any]:
    """C{opt_NAME} methods (usage.Options' way) for each setting and its spellings."""
    methods: dict[str, Any] = {}
    for declared in settings:
        if declared.kind == BOOL:
            handler = _flag(declared, True)
            methods["opt_no_" + declared.name] = _flag(declared, False)
        elif declared.kind == LIST:
            handler = _appender(declared)
        else:
            handler = _parameter(declared)
        methods["opt_" + declared.name] = handler
        for alias in declared.aliases:
            # A function of its own: usage.Options' help breaks on two long
            # spellings of one method.
            methods["opt_" + alias.replace("-", "_")] = _alias(handler, declared)
        if declared.short:
            methods["opt_" + declared.short] = handler
    return methods


class _BaseOptions(usage.Options):
    synopsis = "[options]"
    longdesc = _LONGDESC
    optParameters = [
        [
            "config",
            "c",
            None,
            "TOML configuration file (keys as the long options, '_' or '-' alike); "
            "relative paths in it are relative to the file.",
        ]
    ]

    def __init__(self) -> None:
        super().__init__()
        #: The settings given on the command line, by name.
        self.given: dict[str, Any] = {}

    def postOptions(self) -> None:
        try:
            self.config = buildConfig(self["config"], self.given)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def buildConfig(configPath: str | None, given: dict[str, Any]) -> Config:
    """The configuration file's settings overridden by those of a command line."""
    base = loadConfig(configPath) if configPath else Config()
    own = {s.name for s in SETTINGS}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in own}
    plugin = {k: v for k, v in given.items() if k not in own}
    return base.merged(**overrides, plugin_options=plugin or None).validated()


def optionsClass() -> type[usage.Options]:
    """A C{usage.Options} class over every setting of popserv and its installed plugins."""
    return type("Options", (_BaseOptions,), _methods(s for s, _ in commandLineSettings()))


Options = optionsClass()


def makeService(options: usage.Options) -> IService:
    """Build the popserv service from parsed options."""
    from popserv.service import freezeStartupObjects
    from popserv.service import makeService as _makeService

    try:
        service = _makeService(options.config)
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    from twisted.internet import reactor

    reactor.callWhenRunning(freezeStartupObjects)
    return service
