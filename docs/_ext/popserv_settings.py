"""
The settings reference, generated from the declarations the server itself
uses (L{popserv.config.SETTINGS} and the options of the installed store and
auth-source kinds), so it cannot drift from C{twistd popserv --help}.

Directives:

  - C{popserv-settings}: every setting of popserv, one C{confval} each;
  - C{popserv-plugin-settings}: every option an installed kind declares;
  - C{popserv-kinds}: the installed store and auth-source kinds.

Settings can be referenced as C{:confval:`listen`}.
"""

from __future__ import annotations

import re

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

_KINDS = {
    "bool": "yes or no (a flag on the command line)",
    "int": "a whole number",
    "str": "a string",
    "list": "a list of strings (repeat the option)",
    "days": "a number of days, or NEVER",
}

#: Characters reStructuredText might read as markup.
_MARKUP = re.compile(r"([\\`*_|\[\]<>:{}#=+-])")


def escape(text: str) -> str:
    """C{text} as reStructuredText that reads as exactly that text."""
    return _MARKUP.sub(r"\\\1", text)


def literal(text: str) -> str:
    """C{text} as an inline literal."""
    if "`" in text or text != text.strip() or not text:
        return escape(text)
    return f"``{text}``"


def kindText(declared) -> str:
    text = _KINDS.get(declared.kind, declared.kind)
    if declared.kind == "list" and declared.split:
        text = f"a list of strings (repeat the option, or separate with {declared.split!r})"
    return text


def options(declared) -> list[str]:
    """Every command-line spelling of a setting, as C{twistd popserv} takes it."""
    spellings = [f"--{declared.option}"]
    if declared.kind == "bool":
        spellings.append(f"--no-{declared.option}")
    spellings += [f"--{alias}" for alias in declared.optionAliases]
    if declared.short:
        spellings.append(f"-{declared.short}")
    return spellings


def confval(declared, keys: list[str] | None = None, where: str = "") -> list[str]:
    """reStructuredText lines: one C{confval} for a setting."""
    metavar = f" {declared.metavar}" if declared.metavar else ""
    lines = [
        f".. confval:: {declared.name}",
        f"   :type: {escape(kindText(declared))}",
        "",
        f"   {escape(declared.describe())}",
        "",
        "   :Command line: "
        + ", ".join(
            literal(o + (metavar if declared.kind != "bool" else "")) for o in options(declared)
        ),
        "   :Configuration file: "
        + ", ".join(literal(k) for k in (keys if keys is not None else declared.keys)),
    ]
    if where:
        lines.append(f"   :In a table: {where}")
    if declared.perUser:
        lines.append("   :Per user: yes (see :ref:`per-user-settings`)")
    lines.append("")
    return lines


class _Generated(SphinxDirective):
    has_content = False

    def lines(self) -> list[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        # Generated from the code, not the page: read it again on every build.
        self.env.note_reread()
        container = nodes.container()
        self.state.nested_parse(StringList(self.lines(), "<popserv settings>"), 0, container)
        return container.children


class SettingsDirective(_Generated):
    """Every setting of L{popserv.config.Config}."""

    def lines(self) -> list[str]:
        from popserv.config import SETTINGS

        return [line for declared in SETTINGS for line in confval(declared)]


class PluginSettingsDirective(_Generated):
    """Every option of every installed store and auth-source kind."""

    def lines(self) -> list[str]:
        from popserv.config import pluginSetting, pluginSettings
        from popserv.registry import IAuthSourceKind

        found = pluginSettings()
        if not found:
            return [
                "No installed store or auth-source kind declares options of its own yet.",
                "",
            ]
        lines = []
        for plugin, option in found:
            full = pluginSetting(plugin, option)
            where = ""
            if IAuthSourceKind.providedBy(plugin):
                where = (
                    f"key {literal(option.name)} of a ``[[passdb]]`` table with "
                    f'``kind = "{plugin.name}"``'
                )
            lines += confval(full, where=where)
        return lines


class KindsDirective(_Generated):
    """The installed store and auth-source kinds, with their descriptions."""

    def lines(self) -> list[str]:
        from popserv.registry import authSourceKinds, storeKinds

        lines = []
        for title, kinds in (
            ("**Mail stores** (``--mail-location KIND:ARGS``):", storeKinds()),
            ("**Auth sources** (``--passdb KIND:ARGS``):", authSourceKinds()),
        ):
            lines += [title, ""]
            for name, plugin in sorted(kinds.items()):
                lines += [literal(name + ":"), f"   {escape(plugin.description)}", ""]
        return lines


def setup(app):
    app.add_directive("popserv-settings", SettingsDirective)
    app.add_directive("popserv-plugin-settings", PluginSettingsDirective)
    app.add_directive("popserv-kinds", KindsDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
