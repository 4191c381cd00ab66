"""An incremental safetensors writer: the header first, then one tensor at a time.

`safetensors.numpy.save_file` needs every tensor in memory at once; a converter that streams
cannot afford that. Every shape and dtype is known from the config before any data is read, so
the header is written first and the tensors follow in header order, each written and freed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from gptcpu.engine.weights import ST_DTYPES, evict, f32_to_bf16

# our dtype names -> (safetensors dtype, NumPy dtype of the stored bytes)
DTYPES = {"f32": ("F32", np.float32), "f16": ("F16", np.float16), "bf16": ("BF16", np.uint16),
          "q8": ("I8", np.int8)}
Q8_MAX = 127  # symmetric: -127..127, so -scale * 127 and scale * 127 are both exact
ALIGN = 64  # the data section starts on a cache line; tensors follow in falling itemsize order


class SafetensorsWriter:
    def __init__(self, path: str | Path, specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict):
        """specs: (name, safetensors dtype, shape) for every tensor; they are written in this order
        after a stable sort by falling itemsize, which keeps every tensor aligned to its itemsize."""
        order = sorted(specs, key=lambda s: -np.dtype(ST_DTYPES[s[1]]).itemsize)
        header, offset = {}, 0
        for name, st_dtype, shape in order:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(ST_DTYPES[st_dtype]).itemsize
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % ALIGN)
        self.order = [s[0] for s in order]
        self.nbytes = offset
        self._header = header
        self._next = 0
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, slabs) -> int:
        """Write the next tensor (the order is `self.order`) from an iterable of row slabs whose
        dtype matches the header and whose bytes add up to its size -> bytes written."""
        expected = self.order[self._next]
        if name != expected:
            raise ValueError(f"wrote {name} where {expected} comes next")
        info = self._header[name]
        dtype = np.dtype(ST_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        written = 0
        for slab in slabs:
            if slab.dtype != dtype:
                raise ValueError(f"{name}: a {slab.dtype} slab in a {dtype} tensor")
            self._f.write(memoryview(np.ascontiguousarray(slab)).cast("B"))
            written += slab.nbytes
        if written != end - begin:
            raise ValueError(f"{name}: wrote {written} bytes of {end - begin}")
        self._next += 1
        return written

    def close(self) -> None:
        try:
            if self._next != len(self.order):
                raise ValueError(f"{len(self.order) - self._next} tensors were never written")
            evict(self._f)   # on disk before the folder is renamed into place; loads map huge pages
        finally:
            self._f.close()

    def abort(self) -> None:
        self._f.close()


class OutOfRange(ValueError):
    """A finite value that the target dtype can only hold as infinity (f16 stops at 65,504)."""


def q8_scales(absmax: np.ndarray) -> np.ndarray:
    """Per-channel scales from each channel's largest |weight| (an all-zero channel gets 1)."""
    return np.where(absmax > 0, absmax / np.float32(Q8_MAX), np.float32(1)).astype(np.float32)


def quantize(block: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Round to nearest: |w - q * scale| <= scale / 2 for every weight. scale broadcasts over block."""
    return np.clip(np.rint(np.asarray(block, np.float32) / scale), -Q8_MAX, Q8_MAX).astype(np.int8)


def cast(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """block as dtype (uint16 = bf16 bits, rounded to nearest even), contiguous."""
    if dtype == np.uint16:
        return f32_to_bf16(block)
    with np.errstate(over="ignore"):  # checked below, with a better message
        out = np.ascontiguousarray(block, dtype=dtype)
    if dtype == np.float16 and not np.isfinite(out).all() and np.isfinite(block).all():
        raise OutOfRange(f"values up to {np.abs(block).max():g} overflow f16 (max 65504)")
    return out
