"""Byte streams pydicom reads a DICOM file through: a deflated data set as it inflates (to check a
frame's declared size before inflating all of it), and a file whose writer left out the 128-byte
preamble as if it were there."""

from __future__ import annotations

import io
import os
import zlib
from typing import BinaryIO, cast

PREAMBLE_MAGIC = b"DICM"
DEFLATED_HEAD = 1 << 20  # a value longer than this, in a deflated header, is skipped as it inflates


class _Stream(io.RawIOBase):
    """A readable, seekable stream whose position is `pos`."""

    pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos


class Inflating(_Stream):
    """A deflated data set read as it inflates: seeks forward by inflating and dropping, back
    within what it keeps (as much as a value pydicom reads whole, then steps back over), and
    further back by inflating again from the start, which it gives up on (OSError) once it has
    inflated several times as much as it has read: the check is then left to pydicom."""

    KEEP = DEFLATED_HEAD + (1 << 16)  # how far back it can seek without starting again
    CHUNK = 1 << 16  # inflated at a time

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.start = fh, fh.tell()
        self.spent = self.furthest = 0  # bytes inflated in all, and the furthest offset read
        self._restart()

    def _restart(self) -> None:
        self.fh.seek(self.start)
        self.z = zlib.decompressobj(-zlib.MAX_WBITS)
        self.buf, self.at, self.pos = bytearray(), 0, 0  # inflated bytes, where in them the stream is, its offset

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self.buf) - self.at < n) and not self.z.eof:
            data = self.z.unconsumed_tail or self.fh.read(self.CHUNK)
            if not data:
                break
            if self.at >= 2 * self.KEEP:  # drop what is too far back to seek to, a window at a time
                del self.buf[: self.at - self.KEEP]
                self.at = self.KEEP
            more = self.z.decompress(data, self.CHUNK)
            self.buf += more
            self.spent += len(more)
        end = len(self.buf) if n < 0 else min(len(self.buf), self.at + n)
        out, self.at = bytes(self.buf[self.at : end]), end
        self.pos += len(out)
        self.furthest = max(self.furthest, self.pos)
        return out

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.pos + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < 0:
            raise OSError("cannot seek there in a deflated stream")
        if target < self.pos - self.at:  # before what is kept: inflate again from the start
            if self.spent > 4 * self.furthest + (64 << 20):
                raise OSError("a deflated stream sought back again and again")
            self._restart()
        if target < self.pos:
            self.at, self.pos = self.at - (self.pos - target), target
        while self.pos < target and self.read(min(target - self.pos, self.CHUNK)):
            pass
        return self.pos


def preamble_restored(fh: io.BufferedReader) -> BinaryIO:
    """`fh`, or, where its writer left out the 128-byte preamble but kept the magic, `fh` read as
    if the preamble were there."""
    magic_first = fh.read(4) == PREAMBLE_MAGIC
    fh.seek(0)
    return cast(BinaryIO, _WithPreamble(fh)) if magic_first else fh


class _WithPreamble(_Stream):
    """A file read as if the 128-byte preamble its writer left out (zeros) came before it."""

    SIZE = 128

    def __init__(self, fh: io.BufferedReader) -> None:
        self.fh, self.pos = fh, 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.SIZE + os.fstat(self.fh.fileno()).st_size}
        if whence not in base or base[whence] + offset < 0:
            raise OSError("cannot seek there")
        self.pos = base[whence] + offset
        return self.pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        zeros = max(0, min(len(view), self.SIZE - self.pos))
        view[:zeros] = bytes(zeros)
        self.fh.seek(max(0, self.pos - self.SIZE))
        got = self.fh.readinto(view[zeros:]) if zeros < len(view) else 0
        self.pos += zeros + (got or 0)
        return zeros + (got or 0)
