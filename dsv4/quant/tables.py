"""IQ2_XXS codebook and sign tables: the one place every decoder, encoder and kernel takes them from.

The 256-entry grid is read at import from the `gguf` package's packed copy (2 bits per coordinate,
levels 0/1/2 -> bytes 8/25/43, identical to ggml's `iq2xxs_grid`); the sign table follows from its
parity rule. Quantizer-side lookups (base-3 code -> grid index) are derived here too. Knows nothing
of tensors, backends or the model.
"""
from __future__ import annotations

import numpy as np
from gguf.quants import IQ2_XXS as _GgufIQ2XXS

IQ2XXS_GRID_SIZE = 256
IQ2XXS_GROUP = 8  # coordinates per grid entry (one "octet" of weights)
IQ2XXS_LEVEL_BYTES = (0x08, 0x19, 0x2B)  # decoded magnitude of level 0/1/2, in units of 1/8
N_LEVEL_CODES = 3**IQ2XXS_GROUP  # base-3 codes of 8 levels in {0,1,2}


def _unpack_grid_levels(packed_hex: bytes) -> np.ndarray:
    """Hex text of 512 bytes, each byte = 4 coordinates of 2 bits (lowest first) -> levels [256, 8]."""
    packed = np.frombuffer(bytes.fromhex(packed_hex.decode("ascii")), dtype=np.uint8)
    shifts = np.arange(0, 8, 2, dtype=np.uint8)
    levels = (packed[:, None] >> shifts) & 3
    return levels.reshape(IQ2XXS_GRID_SIZE, IQ2XXS_GROUP).astype(np.uint8)


#: grid levels in {0, 1, 2} per coordinate, [256, 8] uint8.
IQ2XXS_LEVELS: np.ndarray = _unpack_grid_levels(_GgufIQ2XXS.grid_hex)
#: grid magnitudes as stored in ggml's iq2xxs_grid (bytes 8/25/43), [256, 8] uint8.
IQ2XXS_GRID: np.ndarray = np.asarray(IQ2XXS_LEVEL_BYTES, dtype=np.uint8)[IQ2XXS_LEVELS]
#: the same grid as ggml's little-endian uint64 words (byte j = coordinate j), [256] uint64.
IQ2XXS_GRID_U64: np.ndarray = np.ascontiguousarray(IQ2XXS_GRID).view("<u8").reshape(IQ2XXS_GRID_SIZE)

#: ksigns_iq2xs: 7 stored sign bits plus an 8th making the count of negative signs even, [128] uint8.
_idx = np.arange(128, dtype=np.uint8)
KSIGNS_IQ2XS: np.ndarray = (_idx | ((np.unpackbits(_idx[:, None], axis=1).sum(1) & 1) << 7)).astype(np.uint8)
#: kmask_iq2xs: bit j of a sign byte selects the sign of coordinate j, [8] uint8.
KMASK_IQ2XS: np.ndarray = (1 << np.arange(8)).astype(np.uint8)
#: ksigns expanded to +1/-1 per coordinate, [128, 8] float32 (multiplying by it is exact).
SIGN_VALUES: np.ndarray = np.where(
    (KSIGNS_IQ2XS[:, None] & KMASK_IQ2XS[None, :]) != 0, np.float32(-1.0), np.float32(1.0)
).astype(np.float32)


def _level_code_map() -> np.ndarray:
    """Base-3 code sum(l_j * 3**j) of every 8-level vector -> grid index, or -1 if off the grid; [6561] int16."""
    codes = (IQ2XXS_LEVELS.astype(np.int64) * (3 ** np.arange(IQ2XXS_GROUP))).sum(1)
    out = np.full(N_LEVEL_CODES, -1, dtype=np.int16)
    out[codes] = np.arange(IQ2XXS_GRID_SIZE, dtype=np.int16)
    return out


#: base-3 level code -> grid index or -1 (quantizer side; lets a search skip on-grid octets), [6561] int16.
IQ2XXS_CODE_TO_INDEX: np.ndarray = _level_code_map()

for _t in (IQ2XXS_LEVELS, IQ2XXS_GRID, IQ2XXS_GRID_U64, KSIGNS_IQ2XS, KMASK_IQ2XS, SIGN_VALUES, IQ2XXS_CODE_TO_INDEX):
    _t.flags.writeable = False
del _t, _idx
