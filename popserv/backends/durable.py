"""Making a file system change durable: what every file-based store needs."""

from __future__ import annotations

import os

__all__ = ["syncDirectory"]


def syncDirectory(path: str) -> None:
    """
    Make the entries of the directory at C{path} durable (a rename or a new
    file in it survives a power cut once this returns).
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
