"""Hashing and compressing writers: the one pass that turns a tar stream into blobs."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from typing import IO, BinaryIO, Protocol, cast

import zstandard
from isal import igzip_threaded

# isal level 2 compresses about as well as zlib -6 at several times the speed.
GZIP_LEVEL = 2
ZSTD_LEVEL = 3
BLOCK_SIZE = 1 << 20


def threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...


class HashingWriter:
    """Counts and hashes what passes through on its way to `out` (None: hash only)."""

    def __init__(self, out: Sink | None) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.hash.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)

    def flush(self) -> None:
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class Pipelined:
    """Hands chunks to a thread of its own, which feeds `out`.

    Hashing, compressing and writing are C code that releases the GIL: in a second thread they run
    alongside the Python code that walks the tree and builds headers, instead of after it.
    """

    def __init__(self, out: Sink, depth: int = 16) -> None:
        self.out = out
        self._queue: queue.Queue[bytes | bytearray | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nsbuild-layer-writer", daemon=True)
        self._thread.start()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._error is not None:
            raise self._error
        # A memoryview is the producer's reusable buffer: take a copy; bytes/bytearrays are handed over.
        self._queue.put(bytes(data) if isinstance(data, memoryview) else data)
        return len(data)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.out.write(item)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the producer
                    self._error = exc

    def close(self) -> None:
        """Wait until everything is written; raise what the writer thread hit."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


class Compressor:
    """A write-only stream compressing into `out`; output is independent of the thread count."""

    def __init__(self, kind: str, out: Sink) -> None:
        self.kind = kind
        self._stream: BinaryIO | None
        if kind == "gz":
            # Block-parallel igzip: same bytes for any thread count >= 1, no name, mtime 0.
            self._stream = igzip_threaded.open(
                out, "wb", compresslevel=GZIP_LEVEL, threads=threads(), block_size=BLOCK_SIZE
            )
        elif kind == "zstd":
            # zstd's multi-threaded mode gives the same frame for any nbWorkers >= 1.
            params = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, threads=threads())
            self._stream = zstandard.ZstdCompressor(compression_params=params).stream_writer(
                cast("IO[bytes]", out), closefd=False, write_return_read=True
            )
        elif kind == "none":
            self._stream = None
            self._out = out
        else:
            raise ValueError(kind)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._stream is None:
            self._out.write(data)
        else:
            self._stream.write(data)
        return len(data)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


def open_decompressed(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a file that may be gzip- or zstd-compressed, by its magic bytes."""
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller
    magic = f.read(4)
    f.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return igzip_threaded.open(f, "rb")
    if magic == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(f, closefd=True, read_across_frames=True)
    return f


def compression_of(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "gz"
    if magic == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"
