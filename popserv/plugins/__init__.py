"""
popserv's plugins: mail-store and auth-source kinds (see L{popserv.registry}).

Like C{twisted.plugins}, this package spans every C{popserv/plugins}
directory on C{sys.path} that has no C{__init__.py}: a third-party
distribution adds its plugins by shipping C{popserv/plugins/its_name.py}.
Plugin modules stay small; they import their implementation only when a
store or source is built.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
