"""
Maildir storage (cr.yp.to/proto/maildir.html), as Dovecot and Postfix lay it out.

One module per concern:

  - L{names}: what a file name says (unique part, size fields, UIDL) and the
    names deliveries get;
  - L{index}: the C{.popserv.index} size index and the per-maildrop cache;
  - L{scan}: listing a maildrop, reusing and extending the previous listing;
  - L{delivery}: writing a message in C{tmp/} and renaming it into C{new/};
  - L{walk}: finding every maildrop a mail location names;
  - L{store}: the store and the session mailbox, locks and login records.

The public names are imported lazily from here, so C{popserv deliver} loads
the delivery without the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from popserv._lazy import lazyNames

if TYPE_CHECKING:
    from popserv.backends.locking import LOCK_FILE, SHARED_LOCK_FILE
    from popserv.backends.maildir.index import INDEX_FILE, MaildropCache
    from popserv.backends.maildir.names import uidFor, uniquePart
    from popserv.backends.maildir.store import LOGIN_FILE, MaildirMailbox, MaildirStore

__all__ = [
    "MaildirStore",
    "MaildirMailbox",
    "MaildropCache",
    "uniquePart",
    "uidFor",
    "LOCK_FILE",
    "INDEX_FILE",
    "SHARED_LOCK_FILE",
    "LOGIN_FILE",
]

_WHERE = {
    "MaildirStore": "popserv.backends.maildir.store",
    "MaildirMailbox": "popserv.backends.maildir.store",
    "LOGIN_FILE": "popserv.backends.maildir.store",
    "MaildropCache": "popserv.backends.maildir.index",
    "INDEX_FILE": "popserv.backends.maildir.index",
    "uniquePart": "popserv.backends.maildir.names",
    "uidFor": "popserv.backends.maildir.names",
    "LOCK_FILE": "popserv.backends.locking",
    "SHARED_LOCK_FILE": "popserv.backends.locking",
}


__getattr__, __dir__ = lazyNames(globals(), _WHERE, __all__)
