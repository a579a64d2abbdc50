"""Opening an input file as bytes, local or any fsspec URL, decompressed by its suffix (gzip, bz2, xz through fsspec;
zstd through :class:`_ZstdReader`, which fsspec's zstd file lacks: line iteration and an error for a cut file)."""

from __future__ import annotations

import io
from typing import Any


def _compression(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith((".zst", ".zstd")):  # (fsspec knows neither; a .zstd file was read as raw bytes: "non_utf8")
        return "zstd"
    import fsspec.utils

    return fsspec.utils.infer_compression(path)


def open_binary(path: str) -> Any:
    """A buffered binary file (decompressed by suffix) that iterates by lines."""
    import fsspec

    compression = _compression(path)
    if compression == "zstd":  # fsspec's zstd file cannot iterate lines: decompress as a stream ourselves
        return io.BufferedReader(_ZstdReader(fsspec.open(path, "rb").open()), buffer_size=1 << 20)
    return fsspec.open(path, "rb", compression=compression).open()


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a zstd file (one or more frames). A file cut inside a frame raises EOFError, as
    gzip does (zstandard's stream_reader ends quietly there: a truncated download read as a shorter corpus), and
    corrupt data an OSError (zstandard's own ZstdError escaped as a traceback)."""

    def __init__(self, raw: Any):
        import zstandard

        self._raw, self._dctx, self._error = raw, zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._obj = self._dctx.decompressobj()
        self._pending, self._out, self._pos, self._in_frame = b"", b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._pos >= len(self._out):
            chunk, self._pending = self._pending or self._raw.read(1 << 20), b""
            if not chunk:
                if self._in_frame:
                    raise EOFError("compressed file ended inside a zstd frame (truncated)")
                return 0
            if self._obj.eof:  # the previous frame is complete: the next one starts
                self._obj = self._dctx.decompressobj()
            try:
                self._out, self._pos = self._obj.decompress(chunk), 0
            except self._error as e:  # corrupt data: read_file turns the OSError into one ReadError line
                raise OSError(f"corrupt zstd data ({e})") from None
            self._in_frame = not self._obj.eof
            if self._obj.eof:
                self._pending = self._obj.unused_data
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()
