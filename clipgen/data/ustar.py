"""Direct parsing of plain ustar tar headers, shared by the shard decoder and the CC index.

tarfile spends more time on headers than PIL spends on a small PNG, and both readers walk every header of every
shard. Anything unusual (pax or GNU extension headers, base-256 sizes, a bad checksum, an unknown member kind)
makes ``scan`` return None, and the caller reads that tar with tarfile instead.
"""
from __future__ import annotations

from typing import Callable

BLOCK = 512
_ZERO = bytes(BLOCK)
_DATALESS = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos


class TruncatedMember(Exception):
    """A member's data runs past the end of the file (the tar was cut short)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def scan(read_block: Callable[[int], bytes], total: int) -> tuple[list[tuple[str, int, int]], bool] | None:
    """(name, data offset, size) of every regular member in order, and whether an end-of-archive block was
    reached; ``read_block(pos)`` returns the 512 bytes at ``pos`` of a file of ``total`` bytes. None where a header
    needs tarfile; TruncatedMember where a member's data runs past ``total``."""
    out, pos = [], 0
    while pos + BLOCK <= total:
        h = read_block(pos)
        if h == _ZERO:
            return out, True
        try:
            if int(h[148:156].strip(b"\0 ") or b"0", 8) != 256 + sum(h[:148]) + sum(h[156:]):
                return None
            raw = h[124:136]
            if h[257:262] != b"ustar" or raw[:1] in (b"\x80", b"\xff"):
                return None
            size = int(raw.strip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
        kind = h[156:157]
        if kind in (b"0", b"\0"):
            name = h[:100].split(b"\0", 1)[0]
            prefix = h[345:500].split(b"\0", 1)[0] if h[257:263] == b"ustar\0" else b""  # POSIX ustar only
            text = (prefix + b"/" + name if prefix else name).decode("utf-8", errors="surrogateescape")
            if pos + BLOCK + size > total:
                raise TruncatedMember(text)
            out.append((text, pos + BLOCK, size))
        elif kind not in _DATALESS:
            return None
        pos += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
    return out, False
