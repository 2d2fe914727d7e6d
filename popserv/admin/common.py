"""What every admin command shares: exit codes, the one-line error, the configuration."""

from __future__ import annotations

import argparse
import os

from popserv.config import Config, ConfigError, loadConfig

__all__ = [
    "AdminError",
    "configFrom",
    "passwdPath",
    "EX_OK",
    "EX_PROBLEMS",
    "EX_USAGE",
    "EX_NOUSER",
    "EX_TEMPFAIL",
]

EX_OK = 0
EX_PROBLEMS = 1
EX_USAGE = 64
EX_NOUSER = 67
EX_TEMPFAIL = 75


class AdminError(Exception):
    """A failure to report in one line, with the exit code to use."""

    def __init__(self, message: str, code: int = EX_PROBLEMS) -> None:
        super().__init__(message)
        self.code = code


def configFrom(args: argparse.Namespace) -> Config:
    """The configuration file's settings, overridden by the ones given on the command line."""
    try:
        config = loadConfig(args.config) if getattr(args, "config", None) else Config()
    except ConfigError as e:
        raise AdminError(str(e), EX_USAGE) from None
    overrides = {}
    if getattr(args, "passwd", None):
        overrides["passwd"] = os.path.abspath(args.passwd)
    if getattr(args, "mail_location", None):
        overrides["mail_location"] = args.mail_location
    if getattr(args, "passdb", None):
        overrides["passdb"] = tuple(args.passdb)
    return config.merged(**overrides)


def passwdPath(args: argparse.Namespace) -> str:
    config = configFrom(args)
    if not config.passwd:
        raise AdminError("say which passwd-file: --passwd FILE or --config FILE", EX_USAGE)
    return config.passwdPath
