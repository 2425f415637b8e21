"""Checked, atomic writes into the cache: every OSError is one line naming the file (CacheWriteError), a write that
stores part of its bytes is completed, and a file replaces its old version only once it is whole (hidden
temporaries, utils.atomic_path). GrowingNpy appends rows to a .npy file whose length is known only at the end."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from music_continuation.data.cache import manifest_path
from music_continuation.utils import UserError, atomic_path, one_line, write_json


class CacheWriteError(UserError, OSError):
    """Writing into the cache failed (a full disk, a read-only mount, ...): a fault of the run, never of an audio
    file. The message is one line: 'cannot write PATH: reason'."""


@contextlib.contextmanager
def writing(path: Path):
    """Report an OSError raised inside as CacheWriteError('cannot write PATH: reason')."""
    try:
        yield
    except CacheWriteError:
        raise
    except OSError as error:
        raise CacheWriteError(f"cannot write {path}: {error.strerror or one_line(error)}") from None


def _pwrite_all(descriptor: int, data, offset: int) -> None:
    """os.pwrite until every byte of `data` is stored: on a nearly full file system a write can store part of
    its bytes without an error (the next one then raises ENOSPC)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(descriptor, view, offset)
        if written == 0:
            raise OSError(errno.EIO, "a write stored no bytes")
        view, offset = view[written:], offset + written


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with writing(path), atomic_path(path) as tmp_path:
        np.save(tmp_path, np.ascontiguousarray(array))


def write_json_atomic(path: Path, content: dict) -> None:
    with writing(path):
        write_json(path, content)


def write_manifest_atomic(cache_dir: Path, manifest: dict) -> None:
    write_json_atomic(manifest_path(cache_dir), manifest)


@contextlib.contextmanager
def _npy_temporary(path: Path):
    """A descriptor of a hidden temporary that replaces `path` if the block succeeds (utils.atomic_path); an
    OSError of the file's own (creating, syncing, renaming) is CacheWriteError naming `path`."""
    with writing(path), atomic_path(path) as tmp_path:
        descriptor = os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            yield descriptor
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def _scratch_file(folder: Path, name: Path):
    """A descriptor of a nameless file in `folder` (tempfile.TemporaryFile: gone when closed, or when the
    process dies); `name` is the cache file it is scratch space for, named in errors."""
    with writing(name), tempfile.TemporaryFile(dir=folder) as scratch:
        yield scratch.fileno()


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": shape})
    return buffer.getvalue()


class GrowingNpy:
    """A C-ordered .npy file of rows [*row_shape] whose number is known only at the end: rows are appended (every
    write checked), can be read back, and finish(rows) keeps the first `rows` and writes that count into the
    header in place (numpy pads every header so that the first axis can grow to 21 digits).

    Written with pwrite, not through a memory map: pages written through a map stay in the writer's resident
    memory, which would then grow with the track's length; written with pwrite they are only the page cache.
    """

    def __init__(self, descriptor: int, dtype: np.dtype, row_shape: tuple[int, ...], name: Path):
        self.descriptor, self.dtype, self.row_shape, self.name = descriptor, np.dtype(dtype), row_shape, name
        self.row_bytes = self.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        self.rows = 0
        header = _npy_header(self.dtype, (0, *row_shape))
        self.data_offset = len(header)
        self._write(header, 0)

    def _write(self, data, offset: int) -> None:
        with writing(self.name):
            _pwrite_all(self.descriptor, data, offset)

    def append(self, values: np.ndarray) -> None:
        """Append values [n, *row_shape], converted to the file's dtype."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self._write(values, self.data_offset + self.rows * self.row_bytes)
        self.rows += len(values)

    def read(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) as an array [count, *row_shape]."""
        size = count * self.row_bytes
        data = os.pread(self.descriptor, size, self.data_offset + start * self.row_bytes)
        if len(data) != size:
            raise OSError(errno.EIO, f"{self.name}: read {len(data)} of {size} bytes back")
        return np.frombuffer(data, self.dtype).reshape(count, *self.row_shape)

    def finish(self, rows: int) -> None:
        """Keep the first `rows` rows: cut the file after them and write their count into the header."""
        with writing(self.name):
            os.ftruncate(self.descriptor, self.data_offset + rows * self.row_bytes)
        header = _npy_header(self.dtype, (rows, *self.row_shape))
        assert len(header) == self.data_offset, "numpy's header padding did not leave room for the row count"
        self._write(header, 0)
        self.rows = rows
