"""Sphinx configuration: the admin guide, the settings reference, the plugin contracts."""

import sys
from pathlib import Path

HERE = Path(__file__).parent
# The code documented is this checkout's, not an installed copy.
sys.path[:0] = [str(HERE.parent), str(HERE / "_ext")]

from popserv._version import __version__  # noqa: E402

project = "popserv"
author = "the popserv authors"
copyright = "the popserv authors"
release = version = __version__

extensions = [
    "sphinx.ext.intersphinx",
    "popserv_apidocs",
    "popserv_settings",
]

exclude_patterns = ["_build", "examples"]
templates_path: list[str] = []
nitpicky = True  # a reference to a name the code no longer has fails the build

# Twisted's and popserv's own API inventories are added by popserv_apidocs,
# from local files: the build needs no network.
intersphinx_mapping: dict[str, tuple[str, str]] = {}

# pydoctor warnings that are known and waiting for a fix in code owned
# elsewhere; each entry is a substring of the warning. Remove an entry as
# soon as its warning is gone.
#: pydoctor warnings tolerated for now; each one names where it comes from.
pydoctor_expected_warnings: list[str] = []

nitpick_ignore: list[tuple[str, str]] = []

html_theme = "furo"
html_title = f"popserv {release}"
