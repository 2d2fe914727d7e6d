"""
Every text the server can send has every language's words for it (RFC 6856
LANG): the templates are collected from the package source itself, so a new
text without its translations fails here, not in front of a client.
"""

from __future__ import annotations

import ast
import string
from pathlib import Path

import pytest

import popserv
from popserv import errors
from popserv.i18n import LANGUAGES

PACKAGE = Path(popserv.__file__).parent

#: Calls whose first argument is a response text template.
_TEXT_CALLS = {"_t", "_ok"}


def _trees() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def _errorClassNames(trees: list[tuple[Path, ast.Module]]) -> set[str]:
    """Every POP3Error subclass defined anywhere in the package, by name."""
    classes = [n for _, tree in trees for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    found = {"POP3Error"}
    changed = True
    while changed:  # a subclass of a subclass, in any module
        changed = False
        for node in classes:
            if node.name not in found and {_name(b) for b in node.bases} & found:
                found.add(node.name)
                changed = True
    return found


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def collectTemplates() -> dict[str, str]:
    """Every text template in the package, with where it was found."""
    trees = _trees()
    errorClasses = _errorClassNames(trees)
    templates: dict[str, str] = {}
    for path, tree in trees:
        for node in ast.walk(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ClassDef) and node.name in errorClasses:
                for statement in node.body:
                    if (
                        isinstance(statement, ast.Assign)
                        and [_name(t) for t in statement.targets] == ["text"]
                        and isinstance(statement.value, ast.Constant)
                    ):
                        templates[statement.value.value] = where
            elif isinstance(node, ast.Call):
                name = _name(node.func)
                if name in _TEXT_CALLS or name in errorClasses:
                    if node.args and isinstance(node.args[0], ast.Constant):
                        value = node.args[0].value
                        if isinstance(value, str) and value:
                            templates[value] = where
    return templates


TEMPLATES = collectTemplates()


def test_the_collector_finds_every_kind_of_text():
    """The walk sees class texts, error arguments, +OK texts and texts of other modules."""
    assert errors.AutologoutExpired.text in TEMPLATES  # a class's text
    assert "Invalid message number" in TEMPLATES  # CommandError("...") in commands.py
    assert "Begin TLS negotiation" in TEMPLATES  # self._ok("...") in login.py
    assert "Mailbox does not exist" in TEMPLATES  # PermanentFailure("...") in a backend
    assert "Internal server error" in TEMPLATES  # errorFor's own
    assert len(TEMPLATES) > 50


@pytest.mark.parametrize("tag", sorted(LANGUAGES))
def test_every_text_is_translated(tag):
    """Each language in LANGUAGES has its own words for every text the server sends."""
    language = LANGUAGES[tag]
    missing = {t: where for t, where in TEMPLATES.items() if not language.translates(t)}
    assert not missing, f"{tag} lacks: {missing}"


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize("tag", sorted(LANGUAGES))
def test_translations_fill_the_same_fields(tag):
    """A translation names exactly the fields of its template (no KeyError at run time)."""
    language = LANGUAGES[tag]
    for template, text in language.catalog.items():
        assert _fields(text) == _fields(template), template


@pytest.mark.parametrize("tag", sorted(LANGUAGES))
def test_counted_nouns_have_their_forms(tag):
    """The nouns the protocol counts ("5 messages") have forms in every language."""
    language = LANGUAGES[tag]
    for noun in ("message", "octet"):
        assert noun in language.nouns
        assert language.count(5, noun) != f"5 {noun}" or language.source
