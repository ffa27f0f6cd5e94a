"""GGUF tensor formats used by DeepSeek V4 Flash files: the `QuantFormat` enum and `QTensor`.

A QTensor is raw GGUF bytes (numpy memmap view, or a backend array after `prepare`) plus the
format and the logical (PyTorch-order) shape. Nothing here dequantizes; see `dequant.py`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class QuantFormat(enum.IntEnum):
    """GGML type ids (the values stored in GGUF tensor infos)."""

    F32 = 0
    F16 = 1
    Q8_0 = 8
    Q2_K = 10
    Q4_K = 12
    IQ2_XXS = 16
    I32 = 26
    BF16 = 30

    @property
    def block_size(self) -> int:
        """Weights per block."""
        return _BLOCK[self][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return _BLOCK[self][1]

    @property
    def is_quantized(self) -> bool:
        return self.block_size > 1

    def row_bytes(self, n: int) -> int:
        """Bytes of one row of n weights; n must be a multiple of block_size."""
        if n % self.block_size:
            raise ValueError(f"{self.name} rows must be a multiple of {self.block_size} wide, got {n}")
        return n // self.block_size * self.type_size


_BLOCK = {
    QuantFormat.F32: (1, 4),
    QuantFormat.F16: (1, 2),
    QuantFormat.BF16: (1, 2),
    QuantFormat.I32: (1, 4),
    QuantFormat.Q8_0: (32, 34),
    QuantFormat.Q2_K: (256, 84),
    QuantFormat.Q4_K: (256, 144),
    QuantFormat.IQ2_XXS: (256, 66),
}

QK_K = 256  # super-block size of the K and IQ formats


@dataclass(eq=False)
class QTensor:
    """One weight tensor as stored in the file.

    data:   raw bytes, shape [*shape[:-1], row_bytes] uint8 for every format (F32/F16/I32 included),
            either a numpy view into the memory-mapped file or a backend-owned array after prepare().
    fmt:    QuantFormat.
    shape:  logical math shape, PyTorch order (out, in) / (E, out, in); the last dim is the row length.
    name:   GGUF tensor name (for error messages).
    cache:  backend-private derived forms (e.g. a device copy); never part of the semantics.
    """

    data: Any
    fmt: QuantFormat
    shape: tuple[int, ...]
    name: str = ""
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.fmt.row_bytes(self.shape[-1])

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64))

    def rows(self, start: int, stop: int) -> "QTensor":
        """Rows [start, stop) of a 2-D tensor (zero copy: rows are whole blocks)."""
        assert len(self.shape) == 2
        return QTensor(self.data[start:stop], self.fmt, (stop - start, self.shape[1]), f"{self.name}[{start}:{stop}]")

    def expert(self, e: int) -> "QTensor":
        """Expert e of a 3-D [E, out, in] tensor as a 2-D QTensor (zero copy)."""
        assert len(self.shape) == 3
        return QTensor(self.data[e], self.fmt, self.shape[1:], f"{self.name}[{e}]")

    @staticmethod
    def from_bytes(raw: np.ndarray, fmt: QuantFormat, shape: tuple[int, ...], name: str = "") -> "QTensor":
        """Wrap raw GGUF bytes (any uint8 array of the right total size) with a logical shape."""
        shape = tuple(int(s) for s in shape)
        rb = fmt.row_bytes(shape[-1])
        data = np.asarray(raw).view(np.uint8).reshape(*shape[:-1], rb)
        return QTensor(data, fmt, shape, name)
