"""safetensors files as NumPy arrays: read by mmap (zero copy), and the bf16 <-> f32 casts.

NumPy has no bfloat16, so BF16 tensors are viewed as uint16 bit patterns; `bf16_to_f32` and
`f32_to_bf16` convert them. The reader is ours rather than `safetensors.safe_open` because it
returns views into one mmap (no copy, pages read only when touched) and handles BF16 without torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .errors import GptcpuError

# safetensors dtype name -> NumPy dtype of the stored bytes (BF16: raw uint16 bit patterns)
ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_header(path: str | Path) -> tuple[dict, int]:
    """-> ({name: {"dtype", "shape", "data_offsets"}}, byte offset where the data starts)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise GptcpuError(f"{path} is not a readable safetensors file: {e}") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def metadata(path: str | Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {})


def _view(buf, info: dict, start: int, name: str) -> np.ndarray:
    if info["dtype"] not in ST_DTYPES:
        raise GptcpuError(f"tensor {name} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(ST_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    count = (end - begin) // dtype.itemsize
    if count != int(np.prod(info["shape"], dtype=np.int64)):
        raise GptcpuError(f"tensor {name}: {end - begin} bytes do not hold shape {info['shape']}")
    return np.frombuffer(buf, dtype, count, start + begin).reshape(info["shape"])


def mmap_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only view into one shared mmap."""
    header, start = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: _view(mm, info, start, name) for name, info in header.items()}


def mmap_tensor(path: str | Path, name: str, header: dict, start: int) -> np.ndarray:
    """One tensor in its own mmap: freed (and its pages out of RSS) as soon as it is dropped."""
    info = header[name]
    begin, end = info["data_offsets"]
    if end == begin:
        return np.zeros(info["shape"], ST_DTYPES[info["dtype"]])
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
    return _view(mm, info, -begin, name)


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact: bf16 is the top half of an f32)."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (as torch does); NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded
