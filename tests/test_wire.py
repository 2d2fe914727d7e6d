"""The pure wire format: parsing, status lines, CRLF conversion, byte-stuffing, TOP, sizes."""

from hypothesis import given, settings
from hypothesis import strategies as st

from popserv import octets, wire


def encode(message: bytes, chunks: list[int] | None = None, top: int | None = None) -> bytes:
    """Run a message through MessageEncoder split at the given chunk lengths."""
    enc = wire.MessageEncoder(top)
    out = []
    pos = 0
    for n in chunks or []:
        out.append(enc.feed(message[pos : pos + n]))
        pos += n
    out.append(enc.feed(message[pos:]))
    out.append(enc.finish())
    return b"".join(out)


def reference(message: bytes) -> bytes:
    """A slow, obviously-correct line-by-line encoder to compare against."""
    if not message:
        return b".\r\n"
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return out + b".\r\n"


def unstuff(wire_bytes: bytes) -> bytes:
    """What a client reconstructs: drop the terminator, undo the stuffing."""
    assert wire_bytes.endswith(b"\r\n.\r\n") or wire_bytes == b".\r\n"
    body = wire_bytes[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)


def test_parse_command_case_insensitive():
    assert wire.parseCommand(b"retr 1") == wire.Command("RETR", b"1")
    assert wire.parseCommand(b"Top 1 10").args == [b"1", b"10"]


def test_parse_command_keeps_password_spaces():
    """RFC 1939 section 7: PASS arguments may contain spaces."""
    assert wire.parseCommand(b"PASS a b  c ").rest == b"a b  c "


def test_parse_command_garbage_is_unknown():
    for line in (b"", b" ", b"\x00\xff", b"R\xc3\xa9TR 1", b"-12 3", b":"):
        assert wire.parseCommand(line).verb == ""


@given(st.binary(max_size=300))
def test_parse_command_never_raises(line):
    cmd = wire.parseCommand(line)
    assert cmd.verb == "" or (cmd.verb.isalnum() and cmd.verb.isascii())


def test_status_lines():
    assert wire.ok("2 320") == b"+OK 2 320\r\n"
    assert wire.ok() == b"+OK\r\n"
    assert wire.err("locked", "IN-USE") == b"-ERR [IN-USE] locked\r\n"


def test_status_line_cannot_inject_lines_and_is_bounded():
    """RFC 2449 section 4: a response line is at most 512 octets; text can't add lines."""
    line = wire.err("a\r\n+OK forged" + "x" * 1000)
    assert line.count(b"\r\n") == 1 and line.endswith(b"\r\n")
    assert len(line) == wire.MAX_RESPONSE_LINE


def test_first_line_is_stuffed():
    """RFC 1939 section 3: byte-stuffing applies to the first line too."""
    assert encode(b".a\r\nb\r\n") == b"..a\r\nb\r\n.\r\n"


def test_lone_dot_line_is_stuffed():
    assert encode(b"a\n.\nb\n") == b"a\r\n..\r\nb\r\n.\r\n"


def test_empty_message_is_just_the_terminator():
    assert encode(b"") == b".\r\n"
    assert octets.crlfSize(b"") == 0


def test_no_final_newline_still_ends_with_crlf_dot_crlf():
    assert encode(b"Subject: x\n\nbody") == b"Subject: x\r\n\r\nbody\r\n.\r\n"
    assert octets.crlfSize(b"Subject: x\n\nbody") == len(b"Subject: x\r\n\r\nbody\r\n")


def test_mixed_line_endings_and_lone_cr():
    """Bare LF becomes CRLF, CRLF stays, a lone CR is data."""
    assert encode(b"a\nb\r\nc\rd\n") == b"a\r\nb\r\nc\rd\r\n.\r\n"


def test_crlf_split_across_chunks_and_dot_after_boundary():
    message = b"a\r\n.b\r\n"
    for cut in range(len(message) + 1):
        assert encode(message, [cut]) == b"a\r\n..b\r\n.\r\n", cut


def test_top_zero_lines_is_headers_and_blank_line():
    msg = b"H: 1\nH2: 2\n\nbody1\nbody2\n"
    assert encode(msg, top=0) == b"H: 1\r\nH2: 2\r\n\r\n.\r\n"
    assert encode(msg, top=1) == b"H: 1\r\nH2: 2\r\n\r\nbody1\r\n.\r\n"
    assert encode(msg, top=99) == encode(msg)


def test_top_message_without_body_or_header():
    assert encode(b"H: 1\n", top=0) == b"H: 1\r\n.\r\n"
    assert encode(b"\nbody\n.x\n", top=2) == b"\r\nbody\r\n..x\r\n.\r\n"


messages = st.lists(
    st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"x.y", b"\x00", b"\xff"]),
    max_size=60,
).map(b"".join)


@settings(max_examples=400)
@given(messages, st.lists(st.integers(0, 8), max_size=12))
def test_encoding_independent_of_chunking(message, chunks):
    """Byte-stuffing and CRLF conversion are right whatever the chunk boundaries."""
    assert encode(message, chunks) == encode(message)


@settings(max_examples=400)
@given(messages.filter(lambda m: b"\r" not in m.replace(b"\r\n", b"")))
def test_encoding_matches_line_by_line_reference(message):
    assert encode(message) == reference(message)


@settings(max_examples=400)
@given(messages, st.lists(st.integers(0, 8), max_size=12))
def test_size_is_exact_wire_octets_before_stuffing(message, chunks):
    """RFC 1939: the size is what RETR sends before byte-stuffing, whatever the chunking."""
    sizer = octets.CRLFSizer()
    # The same chunks read into one reused buffer, stale bytes left after each.
    reused, buffer = octets.CRLFSizer(), bytearray(b"\r\n\r" * 400)
    pos = 0
    for n in [*chunks, len(message)]:
        chunk = message[pos : pos + n]
        sizer.feed(chunk)
        buffer[: len(chunk)] = chunk
        reused.feed(buffer, len(chunk))
        pos += n
    assert sizer.size == reused.size == len(unstuff(encode(message)))


@settings(max_examples=300)
@given(messages, st.integers(0, 5), st.lists(st.integers(0, 8), max_size=12))
def test_top_is_a_prefix_of_the_message_and_chunk_independent(message, lines, chunks):
    full = encode(message)[:-3]
    top = encode(message, chunks, top=lines)
    assert top == encode(message, top=lines)
    assert full.startswith(top[:-3])


# -- transfer form: what a store may keep, RETR's bytes without the terminator --------


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """C{data} cut at the given lengths (the rest in a last piece)."""
    out, pos = [], 0
    for n in sizes:
        out.append(data[pos : pos + n])
        pos += n
    out.append(data[pos:])
    return out


def transferForm(message: bytes, sizes: list[int] = ()) -> bytes:
    enc = octets.MessageEncoder()
    return b"".join([*(enc.feed(c) for c in chunked(message, list(sizes))), enc.flush()])


def fromTransfer(stored: bytes, sizes: list[int] = (), top: int | None = None) -> bytes:
    enc = octets.MessageEncoder(top, stuffed=True)
    out = []
    for c in chunked(stored, list(sizes)):
        if enc.done:
            break
        out.append(enc.feed(c))
    return b"".join([*out, enc.finish()])


def decoded(stored: bytes, sizes: list[int] = ()) -> bytes:
    dec = octets.TransferDecoder()
    return b"".join(dec.feed(c) for c in chunked(stored, list(sizes)))


TRICKY = [
    b"",
    b".",
    b"..",
    b".\n",
    b"..\n",
    b".\r\n.\r\n..\n",
    b"no final newline",
    b"ends in a lone CR\r",
    b"a\rb\r\r\nc\n\r",
    b"Subject: x\n\n.\n..\n...\nbody\n.last",
    b"Subject: x\r\n\r\n\r\n.\r\n\n.\n",
    b"\n\n\n.",
    b"H: 1\nH: 2\n\nl1\n.l2\n..l3\nl4\r\nl5\rl6\n",
    b"\r\n.\r",
    b"\r",
    b"\n",
]


def chunkings(length: int) -> list[list[int]]:
    import random

    rng = random.Random(length)
    ways = [[]] + [[n] * (length // n + 1) for n in range(1, 8)]
    ways += [[rng.randint(0, 9) for _ in range(length)] for _ in range(4)]
    return ways


def test_transfer_form_of_tricky_messages():
    for message in TRICKY:
        stored = transferForm(message)
        assert stored == encode(message)[:-3], message  # RETR's bytes but the "."
        assert stored == b"" or stored.endswith(b"\r\n")
        assert len(stored) == octets.crlfSize(message) + len(_dotLines(stored))
        for sizes in chunkings(len(message)):
            assert transferForm(message, sizes) == stored, (message, sizes)


def _dotLines(stored: bytes) -> list[bytes]:
    return [ln for ln in stored.split(b"\r\n") if ln.startswith(b".")]


def test_transfer_form_sent_as_the_message_itself_is():
    """RETR passes it through, TOP cuts it: byte for byte the plain encoder's output."""
    for message in TRICKY:
        stored = transferForm(message)
        for sizes in chunkings(len(stored)):
            assert fromTransfer(stored, sizes) == encode(message), (message, sizes)
            for top in (0, 1, 2, 3, 10):
                assert fromTransfer(stored, sizes, top) == encode(message, top=top), (
                    message,
                    sizes,
                    top,
                )


def test_transfer_form_decodes_to_the_message_with_crlf():
    for message in TRICKY:
        stored = transferForm(message)
        for sizes in chunkings(len(stored)):
            assert decoded(stored, sizes) == unstuff(encode(message)), (message, sizes)


def test_pass_through_ends_a_body_without_a_final_line_ending():
    """Defensive: transfer form that lacks its final CRLF still makes a valid response."""
    enc = octets.MessageEncoder(stuffed=True)
    assert enc.feed(b"a\r\nb") == b"a\r\nb"
    assert enc.finish() == b"\r\n.\r\n"
    assert octets.MessageEncoder(stuffed=True).finish() == b".\r\n"


@settings(max_examples=300)
@given(
    messages,
    st.lists(st.integers(0, 8), max_size=12),
    st.lists(st.integers(0, 8), max_size=12),
    st.one_of(st.none(), st.integers(0, 4)),
)
def test_transfer_form_round_trips_whatever_the_chunking(message, into, out, top):
    stored = transferForm(message, into)
    assert stored == transferForm(message)
    assert fromTransfer(stored, out, top) == encode(message, top=top)
    assert decoded(stored, out) == unstuff(encode(message))
    assert octets.crlfSize(decoded(stored)) == octets.crlfSize(message)


def test_wire_keeps_its_names():
    assert wire.MessageEncoder is octets.MessageEncoder
    assert wire.TopLimiter is octets.TopLimiter
    assert wire.TERMINATOR == b".\r\n" and wire.CRLF == b"\r\n"
