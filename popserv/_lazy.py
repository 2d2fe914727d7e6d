"""
Package names imported when first used (PEP 562): a package lists where each
of its public names lives, and loads a module only when one of its names is
asked for, so that a short-lived command loads only what it uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["lazyNames"]


def lazyNames(
    namespace: dict[str, Any], where: Mapping[str, str], public: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """
    The C{__getattr__} and C{__dir__} of a package whose names C{where} maps
    to the modules defining them (absolute module names). C{namespace} is the
    package's C{globals()}: a name, once loaded, is kept there.
    """
    package = namespace["__name__"]
    listed = frozenset(public) | frozenset(where)

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = namespace[name] = getattr(import_module(module), name)
        return value

    def __dir__() -> list[str]:
        return sorted(listed | set(namespace))

    return __getattr__, __dir__
