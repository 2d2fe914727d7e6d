import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dovecot import dovecot  # noqa: E402,F401 (a real Dovecot, see dovecot.py)
from kdc import kdc  # noqa: E402,F401 (a real MIT Kerberos realm, see kdc.py)
from pg import pgdatabase, postgresql  # noqa: E402,F401 (a real PostgreSQL, see pg.py)
from slapd import slapd  # noqa: E402,F401 (a real OpenLDAP slapd, see slapd.py)

from support import ServerProcess, deliver  # noqa: E402

DEMO_USERS = {"alice": "{PLAIN}wonderland", "bob@example.org": "{PLAIN}builder"}


@pytest.fixture
def server(tmp_path):
    """A running popserv with users alice and bob@example.org ({PLAIN} passwords)."""
    srv = ServerProcess(tmp_path, DEMO_USERS)
    srv.deliver = lambda user, msg, **kw: deliver(srv.maildir(user), msg, **kw)
    srv.start()
    yield srv
    srv.stop()
