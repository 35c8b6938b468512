"""Reader for the IDX format of MNIST and Fashion-MNIST, plain or gzip-compressed.

Layout (big-endian): two zero bytes, one type code, one byte ``d`` (number of dimensions), ``d`` unsigned
32-bit sizes, then ``prod(sizes)`` values of the given type in C order. Type codes: ``0x08`` uint8,
``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64. Compression is
detected from the gzip magic bytes, not from the file name. The values are read straight into the
output array (no intermediate copy of the file).
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .dataset import DatasetError

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"


def _read_exact(stream: BinaryIO, n: int, path: Path, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise DatasetError(f"{path}: truncated IDX file: {what} needs {n} bytes, only {len(data)} left")
    return data


def _parse(stream: BinaryIO, path: Path) -> np.ndarray:
    magic = _read_exact(stream, 4, path, "the header")
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_TYPES:
        raise DatasetError(f"{path}: bad IDX magic number 0x{magic.hex()} (expected 0x0000TTDD with type TT "
                           f"in {', '.join(f'{t:02x}' for t in IDX_TYPES)}); not an IDX file")
    dtype, ndim = np.dtype(IDX_TYPES[magic[2]]), magic[3]
    shape = tuple(int(s) for s in np.frombuffer(_read_exact(stream, 4 * ndim, path, f"{ndim} sizes"), ">u4"))
    array = np.empty(shape, dtype=dtype)
    buffer = memoryview(array.reshape(-1).view(np.uint8))
    filled = 0
    while filled < array.nbytes:
        n = stream.readinto(buffer[filled:])
        if not n:
            raise DatasetError(f"{path}: truncated IDX file: {filled} of {array.nbytes} data bytes for shape "
                               f"{shape} of {dtype.name}")
        filled += n
    if stream.read(1):
        raise DatasetError(f"{path}: wrong IDX size: trailing bytes after {array.nbytes} data bytes for shape "
                           f"{shape} of {dtype.name}")
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """The array stored in an IDX file (plain or gzip) as a tensor of the file's dtype and shape.

    Raises ``FileNotFoundError`` for a missing file and ``DatasetError`` naming the file for a bad magic
    number, a truncated file, trailing bytes or broken gzip data.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if compressed else raw
        try:
            array = _parse(stream, path)
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DatasetError(f"{path}: corrupt or truncated gzip data ({err})") from err
    return torch.from_numpy(array)
