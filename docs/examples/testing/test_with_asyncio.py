"""Testing an asyncio POP3 client (here a small one of its own) with pytest-asyncio."""

import asyncio

import pytest


async def fetch_subjects(host, port, user, password):
    """The code under test: the Subject of every message, without deleting any."""
    reader, writer = await asyncio.open_connection(host, port)

    async def command(line):
        if line:
            writer.write(line.encode() + b"\r\n")
        status = await reader.readline()
        if not status.startswith(b"+OK"):
            raise RuntimeError(status.decode().strip())
        return status

    async def multiline():
        lines = []
        while (line := await reader.readline()) != b".\r\n":
            lines.append(line[1:] if line.startswith(b"..") else line)
        return lines

    try:
        await command("")  # the greeting
        await command(f"USER {user}")
        await command(f"PASS {password}")
        count = int((await command("STAT")).split()[1])
        subjects = []
        for n in range(1, count + 1):
            await command(f"TOP {n} 0")
            headers = await multiline()
            subjects += [h[9:].strip().decode() for h in headers if h.startswith(b"Subject: ")]
        await command("QUIT")
        return subjects
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_subjects(pop3_server):
    pop3_server.add_user("bob", "builder")
    pop3_server.deliver("bob", b"Subject: first\r\n\r\none\r\n")
    pop3_server.deliver("bob", b"Subject: second\r\n\r\ntwo\r\n")
    subjects = await fetch_subjects(pop3_server.host, pop3_server.port, "bob", "builder")
    assert subjects == ["first", "second"]
    assert len(pop3_server.messages("bob")) == 2  # TOP deletes nothing


@pytest.mark.asyncio
async def test_slow_server(pop3_server):
    pop3_server.add_user("bob", "builder")
    pop3_server.delay("STAT", 2)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await fetch_subjects(pop3_server.host, pop3_server.port, "bob", "builder")
