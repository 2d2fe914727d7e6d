# The twistd plugin: a shim. popserv itself is imported only when twistd runs it.
# (No __init__.py in twisted/ or twisted/plugins/: it would hide other plugins.)
from twisted.application.service import ServiceMaker

popserv = ServiceMaker(
    "popserv",
    "popserv.tap",
    "A POP3 server (RFC 1939) serving Maildirs",
    "popserv",
)
