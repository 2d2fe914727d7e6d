"""
mbox spools (C{mbox:/var/mail/%u}), as Postfix C{local}, Exim, sendmail and
procmail write them and mutt reads them.

One module per concern:

  - L{format}: separators, C{>From } quoting, sizes, digests, C{X-UIDL};
  - L{lock}: the dotlock and C{fcntl} lock MTAs and mail readers share;
  - L{index}: the offset index, its validation, and the UIDLs it keeps;
  - L{delivery}: appending a message as an MDA does;
  - L{rewrite}: UPDATE, writing the spool anew crash-safely;
  - L{store}: the store and the session mailbox.

The public names are imported lazily from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from popserv._lazy import lazyNames

if TYPE_CHECKING:
    from popserv.backends.mbox.delivery import MboxDelivery
    from popserv.backends.mbox.lock import SpoolLock
    from popserv.backends.mbox.store import MboxMailbox, MboxStore

__all__ = ["MboxStore", "MboxMailbox", "MboxDelivery", "SpoolLock"]

_WHERE = {
    "MboxStore": "popserv.backends.mbox.store",
    "MboxMailbox": "popserv.backends.mbox.store",
    "MboxDelivery": "popserv.backends.mbox.delivery",
    "SpoolLock": "popserv.backends.mbox.lock",
}

__getattr__, __dir__ = lazyNames(globals(), _WHERE, __all__)
