"""
UIDLs carried over from the POP3 server that served a Maildir before popserv
(C{uidl_source}), so that clients which leave mail on the server download
nothing again after the switch.

Each source reads what that server left in the Maildir (formats read from
their sources, not guessed):

  - C{dovecot[:FORMAT]}: C{dovecot-uidlist} (version 1, C{UID FILENAME}, or
    3, C{UID [KEYVALUE...] :FILENAME}, header C{3 V<uidvalidity> N<next>}).
    A record's C{P} field is the UIDL Dovecot saved (C{pop3_save_uidl}, or a
    migration); an empty C{P} means the base file name. Otherwise the UIDL
    is C{pop3_uidl_format} (FORMAT, default C{%08Xu%08Xv}) expanded as
    Dovecot's C{var_expand} does: C{%u} UID, C{%v} UIDVALIDITY, C{%f} the
    base file name, C{%g} the C{G} field or the base file name; a width pads
    with zeros if it starts with 0 and cuts otherwise; C{X} is hexadecimal.
    C{%m} (a header digest Dovecot keeps for mbox only) cannot be recomputed.
  - C{courier}: C{courierpop3dsizelist} (header C{/3 NEXTUID UIDVALIDITY},
    lines C{FILENAME SIZE UID:UIDVALIDITY[:UTF8]}): C{UIDn-v}, or C{UIDn}
    when the UIDVALIDITY is 0 (Courier's C{print_uidl}).
  - C{xuidl}: the C{X-UIDL} header (qpopper, UW, Dovecot's
    C{pop3_reuse_xuidl}).
  - C{uw}: UW ipop3d's C{%08lx%08lx} of UIDVALIDITY and UID, from the
    C{X-UID} header and the C{X-IMAP}/C{X-IMAPbase} header of the message
    (or, failing that, of another message of the maildrop).

A foreign UIDL is taken the first time popserv lists the message, only if
it is an RFC 1939 UIDL and unique in the maildrop (else the message keeps its
native UIDL), and it is then recorded in the index
(L{popserv.backends.maildir.index}), so it stays even if the foreign file
goes away. A message listed without one is recorded as native, so it never
changes later either.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from popserv.backends.maildir.names import baseName, heldUID
from popserv.interfaces import validUID

__all__ = [
    "SOURCES",
    "DOVECOT_FORMAT",
    "UIDLSource",
    "parseSource",
    "expandDovecot",
    "readDovecot",
    "readCourier",
    "headerUIDL",
    "FOUND_FILES",
    "carryOver",
    "foreignNote",
    "storeNote",
]

#: The sources C{uidl_source} names.
SOURCES = ("native", "dovecot", "courier", "xuidl", "uw")
#: Dovecot's default C{pop3_uidl_format}.
DOVECOT_FORMAT = "%08Xu%08Xv"
#: The files each source reads in a maildrop (check-config looks for them).
FOUND_FILES = {"dovecot": "dovecot-uidlist", "courier": "courierpop3dsizelist"}

#: Bytes of a message read at most for its headers (xuidl, uw).
_HEADER_LIMIT = 64 * 1024
_VARIABLE = re.compile(r"%(?:(0)?([0-9]+))?([A-Za-z]*?)([uvmfg%]|\{[a-z]+\})")
_LONG = {"{uid}": "u", "{uidvalidity}": "v", "{md5}": "m", "{filename}": "f", "{guid}": "g"}


def expandDovecot(
    form: str, uid: int, uidvalidity: int, base: str, guid: str | None
) -> str | None:
    """
    C{pop3_uidl_format} expanded for one message, or None if it needs what a
    Maildir does not keep (C{%m}) or uses a modifier popserv does not know.
    """
    out = []
    position = 0
    for match in _VARIABLE.finditer(form):
        out.append(form[position : match.start()])
        position = match.end()
        zero, width, modifiers, key = match.groups()
        key = _LONG.get(key, key)
        if key == "%":
            out.append("%")
            continue
        values = {"u": str(uid), "v": str(uidvalidity), "f": base, "g": guid or base}
        value = values.get(key)
        if value is None:
            return None
        for modifier in modifiers:
            if modifier == "X":
                value = f"{int(value):x}" if value.isdigit() else value
            elif modifier == "L":
                value = value.lower()
            elif modifier == "U":
                value = value.upper()
            else:
                return None
        if width:
            value = value.rjust(int(width), "0") if zero else value[: int(width)]
        out.append(value)
    out.append(form[position:])
    return "".join(out)


def _base(name: str) -> str:
    return name.split(":", 1)[0]


def readDovecot(path: str, form: str = DOVECOT_FORMAT) -> dict[str, str] | None:
    """
    The UIDLs Dovecot serves for the messages its C{dovecot-uidlist} at
    C{path} lists, by base file name; None without a readable file.
    Records whose UIDL cannot be made (C{%m}) are left out.
    """
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            header = f.readline().split()
            if not header:
                return None
            version = header[0]
            uidvalidity = 0
            if version == "1" and len(header) >= 2 and header[1].isdigit():
                uidvalidity = int(header[1])
            elif version == "3":
                for field in header[1:]:
                    if field[:1] == "V" and field[1:].isdigit():
                        uidvalidity = int(field[1:])
            else:
                return None
            found: dict[str, str] = {}
            for line in f:
                line = line.rstrip("\n")
                if version == "1":
                    uid, _, name = line.partition(" ")
                    fields: dict[str, str] = {}
                else:
                    head, sep, name = line.partition(" :")
                    if not sep:
                        continue
                    uid, *extra = head.split(" ")
                    fields = {item[:1]: item[1:] for item in extra if item}
                if not uid.isdigit() or not name:
                    continue
                base = _base(name)
                saved = fields.get("P")
                if saved is not None:
                    uidl: str | None = saved or base
                else:
                    uidl = expandDovecot(form, int(uid), uidvalidity, base, fields.get("G"))
                if uidl is not None:
                    found[base] = uidl
            return found
    except FileNotFoundError:
        return None


def readCourier(path: str) -> dict[str, str] | None:
    """The UIDLs Courier's C{courierpop3dsizelist} at C{path} gives, by base file name."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            header = f.readline()
            if header[:1] != "/" or header[1:].split(" ", 1)[0] not in ("2", "3"):
                return None
            found: dict[str, str] = {}
            for line in f:
                name, _, rest = line.rstrip("\n").rpartition(" ")
                name = name.rpartition(" ")[0]  # the size goes
                parts = rest.split(":")
                if not name or len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
                    continue
                number, uidvalidity = int(parts[0]), int(parts[1])
                base = _base(name)
                if number:
                    found[base] = f"UID{number}-{uidvalidity}" if uidvalidity else f"UID{number}"
                else:  # Courier's version 0 UIDL: the name, escaped
                    found[base] = "".join(
                        c if "!" <= c <= "~" and c not in "'\"+" else f"+{ord(c):02X}"
                        for c in base
                    )
            return found
    except FileNotFoundError:
        return None


def _headers(path: str) -> dict[str, str]:
    """The first value of each header of the message at C{path} (names lowercase)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER_LIMIT)
    except OSError:
        return {}
    end = re.search(rb"\r?\n\r?\n", head)
    if end is not None:
        head = head[: end.start()]
    headers: dict[str, str] = {}
    name = None
    for raw in head.split(b"\n"):
        line = raw.rstrip(b"\r").decode("latin-1")
        if line[:1] in (" ", "\t") and name is not None:
            headers[name] += " " + line.strip()
            continue
        field, sep, value = line.partition(":")
        name = field.strip().lower() if sep else None
        if name is not None and name not in headers:
            headers[name] = value.strip()
        elif name is not None:
            name = None  # a repeated header: the first one counts
    return headers


def headerUIDL(kind: str, path: str, uidvalidity: list[int]) -> str | None:
    """
    The UIDL C{X-UIDL} (C{xuidl}) or UW's C{X-UID} and C{X-IMAP} (C{uw})
    headers of the message at C{path} give. For C{uw}, C{uidvalidity} holds
    the last UIDVALIDITY met in the maildrop, for messages without their own.
    """
    headers = _headers(path)
    if kind == "xuidl":
        return headers.get("x-uidl") or None
    imap = headers.get("x-imapbase") or headers.get("x-imap")
    if imap:
        first = imap.split()[0] if imap.split() else ""
        if first.isdigit():
            uidvalidity[:] = [int(first)]
    uid = headers.get("x-uid", "")
    if not uid.isdigit() or not uidvalidity:
        return None
    return f"{uidvalidity[0]:08x}{int(uid):08x}"


@dataclass(frozen=True)
class UIDLSource:
    """
    Where a maildrop's UIDLs come from at first listing (L{SOURCES}).

    @ivar form: Dovecot's C{pop3_uidl_format}, for C{dovecot}.
    """

    kind: str = "native"
    form: str = DOVECOT_FORMAT

    @property
    def native(self) -> bool:
        return self.kind == "native"

    def proposals(self, maildir: str, messages: Iterable[tuple[str, str]]) -> dict[str, str]:
        """
        The foreign UIDLs of C{messages} (base name, path; in listing order),
        by base name: blocking, run it off the reactor.
        """
        if self.kind == "dovecot":
            found = readDovecot(os.path.join(maildir, FOUND_FILES["dovecot"]), self.form)
            return found or {}
        if self.kind == "courier":
            return readCourier(os.path.join(maildir, FOUND_FILES["courier"])) or {}
        if self.kind in ("xuidl", "uw"):
            uidvalidity: list[int] = []
            proposed = {}
            for base, path in messages:
                uidl = headerUIDL(self.kind, path, uidvalidity)
                if uidl is not None:
                    proposed[base] = uidl
            return proposed
        return {}


def parseSource(spec: str) -> UIDLSource:
    """
    C{native}, C{dovecot}, C{dovecot:FORMAT}, C{courier}, C{xuidl} or C{uw}.

    @raise ValueError: anything else.
    """
    kind, sep, form = spec.partition(":")
    if kind not in SOURCES:
        raise ValueError(f"not a UIDL source: {spec!r} (one of {', '.join(SOURCES)})")
    if sep and kind != "dovecot":
        raise ValueError(f"{kind} takes no format")
    if kind == "dovecot" and sep:
        if not form:
            raise ValueError("dovecot: an empty pop3_uidl_format")
        if expandDovecot(form, 1, 1, "name", None) is None:
            raise ValueError(
                f"dovecot: pop3_uidl_format {form!r} uses what a Maildir does not keep "
                "(%m) or an unknown modifier; the saved P fields are read anyway"
            )
    return UIDLSource(kind, form or DOVECOT_FORMAT)


def carryOver(
    source: UIDLSource,
    maildir: str,
    found: list[tuple[int, str, str, int, str]],
    recorded: dict[str, str],
    taken: set[str],
) -> int:
    """
    Give the messages C{found} (scan tuples C{(order, unique, uid, size,
    path)}, changed in place) their recorded or foreign UIDLs; record those
    taken now (C{""}: native) in C{recorded}. C{taken}: UIDLs of messages
    listed already. Returns how many were recorded now.
    """
    bases = [baseName(entry[4]) for entry in found]
    # A name that holds its UIDL (a migration's, a delivery's given one)
    # keeps it: no other server's file or header says otherwise.
    given = {
        base for base, entry in zip(bases, found, strict=True) if heldUID(entry[1]) is not None
    }
    fresh = [
        (base, entry[4])
        for base, entry in zip(bases, found, strict=True)
        if base not in recorded and base not in given
    ]
    record = bool(fresh) and not source.native
    proposed = source.proposals(maildir, fresh) if record else {}
    wanted: list[str | None] = []
    for base in bases:
        uidl = recorded.get(base)
        if uidl is None and base not in given:
            uidl = proposed.get(base)
            if uidl is not None and not validUID(uidl):
                uidl = None
        wanted.append(uidl or None)
    # Unique: a foreign UIDL met twice, or equal to another message's, is not taken.
    counts: dict[str, int] = {}
    for entry, uidl in zip(found, wanted, strict=True):
        key = uidl or entry[2]
        counts[key] = counts.get(key, 0) + 1
    changed = 0
    for i, (entry, base, uidl) in enumerate(zip(found, bases, wanted, strict=True)):
        if uidl is not None and (counts[uidl] > 1 or uidl in taken):
            uidl = None
        if base not in recorded and record:
            recorded[base] = uidl or ""
            changed += 1
        if uidl is not None and uidl != entry[2]:
            found[i] = (entry[0], entry[1], uidl, entry[3], entry[4])
    return changed


def foreignNote(maildirs: Iterable[str], source: str) -> str | None:
    """
    What C{check-config} and C{migrate} say about other servers' UIDL files
    in C{maildirs} (e.g. C{found dovecot-uidlist in 3 maildrops;
    --uidl-source is native}), or None if there are none.
    """
    counts = dict.fromkeys(FOUND_FILES, 0)
    for path in maildirs:
        for kind, name in FOUND_FILES.items():
            if os.path.isfile(os.path.join(path, name)):
                counts[kind] += 1
    found = [f"{FOUND_FILES[kind]} in {n} maildrops" for kind, n in counts.items() if n]
    if not found:
        return None
    return f"found {', '.join(found)}; --uidl-source is {source}"


def storeNote(store: object) -> str | None:
    """L{foreignNote} for a Maildir store's maildrops (None for other stores)."""
    location = getattr(store, "location", None)
    if location is None or not hasattr(store, "uidlSource"):
        return None
    from popserv.threads import waitFor

    users = waitFor(store.listMaildrops())  # type: ignore[attr-defined]
    if not isinstance(users, list):
        return None
    source = store.uidlSource  # type: ignore[attr-defined]
    name = "native" if source is None else source.kind
    paths = []
    for user in users:
        try:
            paths.append(location.expand(user))
        except Exception:
            continue
    return foreignNote(paths, name)
