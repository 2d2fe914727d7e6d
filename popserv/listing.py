"""
A maildrop's listing stored column-wise: L{Listing}.

A session holds its listing for as long as it is logged in, and a store may
keep many between logins: one L{MessageInfo} per message (a tuple, two ints
and two strings, about 400 bytes for a Maildir message) made the listing most
of an idle session's memory. A L{Listing} keeps the UIDLs in one string, the
keys in one string when they are strings, and the sizes, the string ends and
the delivery times in one C{array}: a few objects per listing, not five per
message. A L{MessageInfo} is made when one is asked for.

In a small listing, a UIDL found within its key (a Maildir name holds its
unique part) is not stored again: only where it stands. A big one keeps its
UIDLs joined all the same: UIDL then splits one string rather than cutting
out each UIDL (100,000 messages: about 5 ms more for UIDL, 20 for the
listing), and memory there is per maildrop, not per idle session.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from itertools import accumulate, repeat
from operator import add, itemgetter
from typing import Any, overload

from popserv.interfaces import MessageInfo

__all__ = ["Listing", "EMPTY", "SHARED_UIDS_MAX"]

_newInfo = partial(tuple.__new__, MessageInfo)

#: Between the UIDLs of the joined column: never in an RFC 1939 UIDL.
_UID_SEPARATOR = "\n"
#: Between the keys of the joined column: never in a file name.
_KEY_SEPARATOR = "\0"
#: Up to this many messages, UIDLs within their keys are not stored again.
SHARED_UIDS_MAX = 1024


def _joined(values: list[Any], separator: str) -> tuple[str, list[int]] | None:
    """
    C{values} as one string and the end of each plus one (the next start), or
    None if they are not all strings free of C{separator}.
    """
    try:
        text = separator.join(values)
    except TypeError:
        return None
    if text.count(separator) != len(values) - 1 and values:
        return None
    return text, list(accumulate(map(add, map(len, values), repeat(1))))


def _within(
    uids: list[Any], keys: list[str], stops: list[int]
) -> tuple[list[int], list[int]] | None:
    """
    Where each UIDL stands in the joined C{keys} (whose ends plus one are
    C{stops}): its start and its end; None if one is not within its key, or
    the listing is big (see the module).
    """
    if not uids or len(uids) > SHARED_UIDS_MAX:
        return None
    starts, ends = [], []
    first = 0
    for uid, key, stop in zip(uids, keys, stops, strict=True):
        at = key.find(uid) if type(uid) is str else -1
        if at < 0:
            return None
        starts.append(first + at)
        ends.append(first + at + len(uid))
        first = stop
    return starts, ends


def _runs(indexes: list[int], n: int) -> list[list[int]] | None:
    """Ascending C{indexes} (each below C{n}) as runs C{[start, stop)}; None if not ascending."""
    runs: list[list[int]] = []
    last = -1
    for index in indexes:
        if index == last + 1 and runs:
            runs[-1][1] = index + 1
        elif last < index < n:
            runs.append([index, index + 1])
        else:
            return None
        last = index
    return runs


def _packed(ints: list[int], n: int) -> array[int]:
    """
    The integer column: in 4-byte items if the listing is small and every
    value fits (sizes under 2 GiB, times before 2038), which halves what an
    idle session's listing holds; else in 8-byte items.
    """
    if n <= SHARED_UIDS_MAX:
        try:
            return array("i", ints)
        except OverflowError:
            pass
    return array("q", ints)


class Listing(Sequence[MessageInfo]):
    """
    An immutable sequence of L{MessageInfo}, stored column-wise (see the
    module). Equal to the tuple of the same messages, and hashed alike.

    The columns: C{_uids} all UIDLs joined by a newline (a tuple if one held
    a newline; None if each is within its key); C{_keys} all keys joined by
    NUL if they are strings (else a tuple, or an integer array from
    L{ofColumns}); C{_ints} (4- or 8-byte items, see L{_packed}) the sizes, then the end
    (plus one) of each UIDL in C{_uids} (or its end in C{_keys}), then the
    end plus one of each key, then the delivery times if they are all ints
    (else zeros and C{_received} is their array if all are floats, else
    their tuple), then the start of each
    UIDL in C{_keys} if C{_uids} is None, and last the total size.
    """

    __slots__ = ("_n", "_uids", "_keys", "_received", "_ints")

    _n: int
    _uids: str | tuple[str, ...] | None
    _keys: str | tuple[Any, ...] | array[int]
    _received: array[float] | tuple[float | None, ...] | None
    _ints: array[int]

    def __init__(
        self,
        uids: Iterable[str],
        sizes: Iterable[int],
        keys: Iterable[Any],
        received: Iterable[float | None],
    ) -> None:
        """
        The listing of the messages whose UIDLs, sizes, keys and delivery
        times are these columns (in listing order, of equal length).
        """
        uidList, keyList, receivedList = list(uids), list(keys), list(received)
        ints = list(sizes)
        n = len(ints)
        if not len(uidList) == len(keyList) == len(receivedList) == n:
            raise ValueError("the columns of a listing differ in length")
        self._n = n
        total = sum(ints)
        keys = _joined(keyList, _KEY_SEPARATOR)
        within = None if keys is None else _within(uidList, keyList, keys[1])
        if within is not None:
            self._uids = None
            ints += within[1]
        elif (uidText := _joined(uidList, _UID_SEPARATOR)) is not None:
            self._uids = uidText[0]
            ints += uidText[1]
        else:
            self._uids = tuple(uidList)
            ints += repeat(0, n)
        if keys is None:
            self._keys = tuple(keyList)
            ints += repeat(0, n)
        else:
            self._keys = keys[0]
            ints += keys[1]
        if all(type(value) is int for value in receivedList):
            self._received = None
            ints += receivedList  # type: ignore[arg-type]
        elif all(type(value) is float for value in receivedList):
            self._received = array("d", receivedList)  # (a database's times)
            ints += repeat(0, n)
        else:
            self._received = tuple(receivedList)
            ints += repeat(0, n)
        if within is not None:
            ints += within[0]
        ints.append(total)  # last: an int object less for each listing
        self._ints = _packed(ints, n)  # made whole: no room left over for growth

    @classmethod
    def ofColumns(
        cls,
        uids: Sequence[str],
        sizes: array[int],
        keys: Sequence[Any],
        received: array[float],
    ) -> Listing:
        """
        The listing of columns as a database returns them (sizes as an
        C{array('q')}, delivery times as an C{array('d')}), kept as they are:
        no UIDL is looked for in its key and no string end is counted (100k
        messages: about 3 ms rather than 30 through the constructor), for a
        string object per UIDL. A small listing (what idle sessions hold)
        joins its UIDLs and packs its integers all the same: a few hundred
        bytes less a session.
        """
        n = len(sizes)
        if not len(uids) == len(keys) == len(received) == n:
            raise ValueError("the columns of a listing differ in length")
        if not n:
            return EMPTY
        listing = cls.__new__(cls)
        listing._n = n
        listing._keys = keys if isinstance(keys, array) else tuple(keys)
        listing._received = array("d", received)
        joined = _joined(list(uids), _UID_SEPARATOR) if n <= SHARED_UIDS_MAX else None
        if joined is not None:
            # The sizes, the UIDL ends; no key ends or integer times (zeros); the total.
            listing._uids = joined[0]
            listing._ints = _packed([*sizes, *joined[1], *repeat(0, 2 * n), sum(sizes)], n)
        else:
            listing._uids = tuple(uids)
            # The sizes; no UIDL ends, key ends or integer times (zeros); the total.
            listing._ints = sizes + array("q", bytes(24 * n)) + array("q", [sum(sizes)])
        return listing

    @classmethod
    def of(cls, infos: Iterable[MessageInfo]) -> Listing:
        """The listing of these messages."""
        if isinstance(infos, Listing):
            return infos
        infos = list(infos)
        return cls(
            [info.uid for info in infos],
            [info.size for info in infos],
            [info.key for info in infos],
            [info.received for info in infos],
        )

    @property
    def totalSize(self) -> int:
        """The sum of the sizes (STAT without deletions), precomputed."""
        return self._ints[-1]

    # -- columns, for whole-listing work (LIST, UIDL, relisting) --

    def uids(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The UIDLs of messages C{start} to C{stop} (0-based, as a slice)."""
        n = self._n
        if self._uids is None:
            start, stop, _ = slice(start, stop).indices(n)
            ints, keys = self._ints, self._keys
            return [
                keys[first:end]
                for first, end in zip(
                    ints[4 * n + start : 4 * n + stop], ints[n + start : n + stop], strict=True
                )
            ]
        return self._column(self._uids, _UID_SEPARATOR, n, start, stop)

    def keys(self, start: int = 0, stop: int | None = None) -> list[Any]:
        """The keys of messages C{start} to C{stop}."""
        return self._column(self._keys, _KEY_SEPARATOR, 2 * self._n, start, stop)

    def sizes(self, start: int = 0, stop: int | None = None) -> array[int]:
        """The sizes of messages C{start} to C{stop}."""
        start, stop, _ = slice(start, stop).indices(self._n)
        return self._ints[start:stop]

    def received(self, start: int = 0, stop: int | None = None) -> Sequence[float | None]:
        """The delivery times of messages C{start} to C{stop}."""
        start, stop, _ = slice(start, stop).indices(self._n)
        if self._received is not None:
            return self._received[start:stop]
        n = self._n
        return self._ints[3 * n + start : 3 * n + stop]

    def _column(
        self,
        column: str | tuple[Any, ...],
        separator: str,
        ends: int,
        start: int,
        stop: int | None,
    ) -> list[Any]:
        start, stop, _ = slice(start, stop).indices(self._n)
        if type(column) is not str:  # a tuple, or an array of integer keys
            return list(column[start:stop])
        if start >= stop:
            return []
        ints = self._ints
        first = ints[ends + start - 1] if start else 0
        return column[first : ints[ends + stop - 1] - 1].split(separator)  # type: ignore[return-value]

    def _item(self, column: str | tuple[Any, ...], ends: int, index: int) -> Any:
        if type(column) is not str:  # a tuple, or an array of integer keys
            return column[index]
        ints = self._ints
        return column[ints[ends + index - 1] if index else 0 : ints[ends + index] - 1]

    def select(self, indexes: Iterable[int]) -> Listing:
        """The listing of the messages at these positions (0-based), in this order."""
        indexes = list(indexes)
        if len(indexes) > SHARED_UIDS_MAX:
            runs = _runs(indexes, self._n)
            if runs is not None and runs:
                spliced = self._spliced(runs)
                if spliced is not None:
                    return spliced
        if len(indexes) < 2:  # itemgetter gives a tuple for two or more
            return Listing.of([self[i] for i in indexes])
        pick = itemgetter(*indexes)
        columns = self.uids(), self.sizes(), self.keys(), self.received()
        return Listing(*map(pick, columns))

    # -- the Sequence --

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> MessageInfo: ...

    @overload
    def __getitem__(self, index: slice) -> Listing: ...

    def __getitem__(self, index: int | slice) -> MessageInfo | Listing:
        n = self._n
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return Listing(
                    self.uids(start, stop),
                    self.sizes(start, stop),
                    self.keys(start, stop),
                    self.received(start, stop),
                )
            return self.select(range(start, stop, step))
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("listing index out of range")
        received = self._received
        return _newInfo(
            (
                self._keys[self._ints[4 * n + index] : self._ints[n + index]]
                if self._uids is None
                else self._item(self._uids, n, index),
                self._ints[index],
                self._item(self._keys, 2 * n, index),
                self._ints[3 * n + index] if received is None else received[index],
            )
        )

    def __iter__(self) -> Iterator[MessageInfo]:
        columns = self.uids(), self.sizes(), self.keys(), self.received()
        return map(_newInfo, zip(*columns, strict=True))

    def __reversed__(self) -> Iterator[MessageInfo]:
        return reversed(list(self))

    def __add__(self, other: object) -> Listing:
        """The messages of this listing, then those of C{other} (a sequence of them)."""
        if not isinstance(other, Sequence):
            return NotImplemented
        if not isinstance(other, Listing):
            other = Listing.of(other)  # type: ignore[arg-type]
        if self._n + other._n > SHARED_UIDS_MAX and self._n and other._n:
            appended = self._spliced([[0, self._n]], other)
            if appended is not None:
                return appended
        return Listing(
            self.uids() + other.uids(),
            [*self.sizes(), *other.sizes()],
            self.keys() + other.keys(),
            [*self.received(), *other.received()],
        )

    def _joinedForm(self) -> bool:
        return type(self._uids) is str and type(self._keys) is str and self._received is None

    def _spliced(self, runs: list[list[int]], other: Listing | None = None) -> Listing | None:
        """
        The messages of these C{[start, stop)} runs of this listing, then
        those of C{other}, made without taking this listing apart: its joined
        strings and array are cut and copied whole (100k: a removal and new
        mail relisted in about 20 ms instead of 150). None unless this listing
        holds its UIDLs and keys joined and C{other}'s values fit that form.
        """
        if not self._joinedForm():
            return None
        tail = None
        if other is not None:
            uids = _joined(other.uids(), _UID_SEPARATOR)
            keys = _joined(other.keys(), _KEY_SEPARATOR)
            try:
                received = array("q", other.received())
            except (TypeError, OverflowError):
                return None
            if uids is None or keys is None:
                return None
            tail = (uids, keys, array("q", other.sizes()), received)
        n, ints = self._n, self._ints
        if ints.typecode != "q":
            ints = array("q", ints)  # (a small listing's; the spliced one is big)
        uidTexts, keyTexts, uidStops, keyStops = [], [], [], []
        sizes, times = array("q"), array("q")
        uidAt = keyAt = 0  # where the next part starts in the joined strings made
        for start, stop in runs:
            uidFirst = ints[n + start - 1] if start else 0
            keyFirst = ints[2 * n + start - 1] if start else 0
            uidTexts.append(self._uids[uidFirst : ints[n + stop - 1] - 1])  # type: ignore[index]
            keyTexts.append(self._keys[keyFirst : ints[2 * n + stop - 1] - 1])  # type: ignore[index]
            sizes += ints[start:stop]
            times += ints[3 * n + start : 3 * n + stop]
            uidShift, keyShift = uidAt - uidFirst, keyAt - keyFirst
            uidStops += [end + uidShift for end in ints[n + start : n + stop]]
            keyStops += [end + keyShift for end in ints[2 * n + start : 2 * n + stop]]
            uidAt += ints[n + stop - 1] - uidFirst
            keyAt += ints[2 * n + stop - 1] - keyFirst
        if tail is not None:
            (uidText, uidEnds), (keyText, keyEnds), tailSizes, tailTimes = tail
            uidTexts.append(uidText)
            keyTexts.append(keyText)
            sizes += tailSizes
            times += tailTimes
            uidStops += [end + uidAt for end in uidEnds]
            keyStops += [end + keyAt for end in keyEnds]
        spliced = Listing.__new__(Listing)
        spliced._n = len(sizes)
        spliced._uids = _UID_SEPARATOR.join(uidTexts)
        spliced._keys = _KEY_SEPARATOR.join(keyTexts)
        spliced._received = None
        spliced._ints = (
            sizes + array("q", uidStops) + array("q", keyStops) + times + array("q", [sum(sizes)])
        )
        return spliced

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Listing):
            return (
                self._n == other._n
                and self.uids() == other.uids()
                and self.sizes() == other.sizes()
                and self.keys() == other.keys()
                and list(self.received()) == list(other.received())
            )
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Listing({list(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Listing, (self.uids(), self.sizes().tolist(), self.keys(), list(self.received())))


#: The empty listing, to share: an empty maildrop's session then holds none of its own.
EMPTY = Listing((), (), (), ())
