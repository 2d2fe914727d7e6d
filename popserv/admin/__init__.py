"""
C{popserv}: the administrator's command (also C{python -m popserv})::

    popserv pw [--scheme ARGON2ID]            hash a password for the passwd-file
    popserv user add|del|list ...             edit a passwd-file safely
    popserv deliver USER < message            deliver into the mail store (MDA)
    popserv check-config --config FILE        report every problem, one a line
    popserv uidl USER --config FILE           the UIDLs the server would serve
    popserv db init|upgrade|status ...        the database schema of a pgsql: store
    popserv migrate --from LOC --to LOC       copy maildrops between stores
    popserv serve --workers N [OPTIONS]       N worker processes on shared sockets
    popserv selfsigned DIR [HOST...]          a self-signed certificate to try TLS

Exit codes follow sysexits(3) where Postfix and scripts look at them:
0 ok, 64 usage, 67 unknown user, 75 temporary failure (retry), 1 problems found.
"""

from popserv.admin.check import checkConfig
from popserv.admin.cli import main
from popserv.admin.mail import deliver
from popserv.admin.users import editPasswdFile

__all__ = ["main", "deliver", "editPasswdFile", "checkConfig"]
