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

from gptcpu.engine.weights import ST_DTYPES, f32_to_bf16

# our dtype names -> (safetensors dtype, NumPy dtype of the stored bytes)
DTYPES = {"f32": ("F32", np.float32), "f16": ("F16", np.float16), "bf16": ("BF16", np.uint16)}
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

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor (the order is `self.order`); its dtype and shape must match."""
        expected = self.order[self._next]
        info = self._header[name]
        if name != expected:
            raise ValueError(f"wrote {name} where {expected} comes next")
        if list(array.shape) != info["shape"] or array.dtype != ST_DTYPES[info["dtype"]]:
            raise ValueError(f"{name}: {array.dtype}{list(array.shape)} does not match the header")
        self._f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self.order):
            raise ValueError(f"{len(self.order) - self._next} tensors were never written")

    def abort(self) -> None:
        self._f.close()


def cast_into(out: np.ndarray, src: np.ndarray, chunk_bytes: int = 64 << 20) -> None:
    """out[...] = src, cast to out's dtype (uint16 = bf16 bits), a slab of rows at a time so the
    temporaries stay small whatever the tensor size or the source's strides."""
    if out.ndim == 0 or out.shape[0] == 0:
        return
    rows = max(1, chunk_bytes // max(1, src[0].size * 4))
    for r in range(0, out.shape[0], rows):
        part = src[r:r + rows]
        if out.dtype == np.uint16:
            out[r:r + rows] = f32_to_bf16(part)
        else:
            out[r:r + rows] = part
