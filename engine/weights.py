"""safetensors files as NumPy arrays: read by mmap (zero copy), and the bf16 <-> f32 casts.

NumPy has no bfloat16, so BF16 tensors are viewed as uint16 bit patterns; `bf16_to_f32` and
`f32_to_bf16` convert them. The reader is ours rather than `safetensors.safe_open` because it
returns views into one mmap (no copy, pages read only when touched) and handles BF16 without torch.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from . import blas, kernels
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


def map_file(path: str | Path) -> mmap.mmap:
    """A read-only mmap of the whole file that asks for transparent huge pages.

    Where the kernel's page cache supports large folios (Linux 6.x on ext4, xfs, btrfs), the
    pages it reads from disk for this mapping come in 2 MB folios, mapped 2 MB at a time.
    Decode streams every weight once per token, and on 4 KB pages the hardware prefetchers stop
    at every page: GPT-2-small, 2 threads, alternating processes on the same files, decode f32
    69.4-70.6 -> 71.9-73.1 tok/s, bf16 120.7-128.6 -> 130.6-133.2, q8 214.9-223.7 -> 226.6-229.8.
    Still zero copy. Pages already cached in small folios stay so: see `evict`.
    """
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:   # a kernel without transparent huge pages: 4 KB pages
            pass
    return mm


def evict(f) -> None:
    """Put a file just written (an open file object) on disk and out of the page cache.

    The pages a write leaves cached are small folios, which `map_file` would then map 4 KB at a
    time until the cache drops them; read back from disk, they come in huge pages."""
    f.flush()
    try:
        os.fsync(f.fileno())
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):   # (a file system that cannot sync: fine)
            raise
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:   # only a hint
            pass


def mmap_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only view into one shared mmap (`map_file`)."""
    header, start = read_header(path)
    mm = map_file(path)
    return {name: _view(mm, info, start, name) for name, info in header.items()}


def mmap_tensor(path: str | Path, name: str, header: dict, start: int) -> np.ndarray:
    """One tensor in its own mmap: freed (and its pages out of RSS) as soon as it is dropped."""
    info = header[name]
    begin, end = info["data_offsets"]
    if end == begin:
        return np.zeros(info["shape"], ST_DTYPES[info["dtype"]])
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
    return _view(mm, info, -begin, name)


def transposed(table: np.ndarray, width: int, rows: int = 1024, out: np.ndarray | None = None) -> np.ndarray:
    """table [V, C] -> its transpose as a C-contiguous [C, width] array (width >= V; the columns
    past V are zero), copied `rows` rows at a time; or into out [..., width] (zeros), whose
    leading axes hold the C rows in order (a view: out[..., v] is column v of the table).
    Where table is a view of a file's mmap, the pages of each block copied leave this process's
    RSS (madvise DONTNEED: they stay in the page cache, and what is read again faults back in),
    so that the copy does not hold the table twice."""
    V, C = table.shape
    out = np.zeros((C, width), table.dtype) if out is None else out
    release = _Release(table)
    for v0 in range(0, V, rows):
        block = table[v0:v0 + rows]
        out[..., v0:v0 + len(block)] = block.T.reshape(*out.shape[:-1], len(block))
        release.upto(block)
    return out


def pairs_shape(shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The shape of q8 weights [K, N] stored as pairs (`pairs`)."""
    return 4, -(-shape[0] // 8), shape[1], 2


def pairs(w: np.ndarray, rows: int = 1024, out: np.ndarray | None = None) -> np.ndarray:
    """q8 weights [K, N] -> stored as pairs in four stripes, [4, K8/8, N, 2] (K8: K rounded up
    to 8, the rows past K zero): out[p, g, j] = (w[8g + 2p, j], w[8g + 2p + 1, j]).

    A pair holds the two weights that one int16-pair lane of the GEMV and the GEMM multiplies,
    so that the kernels widen them with one load where [K, N] takes two loads and a shuffle
    (kernels._pairs_of_rows; 2 threads, Xeon, hot: GPT-2 small's QKV matrix 56 -> 40 us; its
    q8 decode 1.06-1.12x from memory). The GEMV reads eight rows (four pair rows) at a time,
    one from each stripe: four streams, each through its stripe in order, where the four pair
    rows side by side made four short runs (one row, 1.5 KB for GPT-2's MLP output matrix) and a
    jump; from memory, 2 threads, Xeon: that matrix 168 -> 123 us a call, the MLP input 137 ->
    112. Copied `rows` (even) rows at a time, releasing a mapped w's pages as transposed does;
    into out where given (zeros, of pairs_shape)."""
    K, N = w.shape
    out = np.zeros(pairs_shape(w.shape), np.int8) if out is None else out
    release = _Release(w)
    for k0 in range(0, K, rows):   # (rows is even: a block starts a pair)
        block = w[k0:k0 + rows]
        kernels.interleave(block, out, k0 // 2)
        release.upto(block)
    return out


class _Release:
    """The pages of a table in a read-only file mapping, dropped from RSS as it is copied block
    by block (madvise DONTNEED: they stay in the page cache, and what is read again faults back
    in), so that a copy made at load does not hold the table twice. Whole pages only; nothing
    where the table is not such a mapping's C-contiguous view (a strided view's pages hold more
    than it)."""

    def __init__(self, table: np.ndarray):
        self.mm = _mapping(table) if table.flags.c_contiguous else None
        if self.mm is not None:   # the mapping's bytes [.., released) are out of RSS
            self.base = np.frombuffer(self.mm, np.uint8, 1).ctypes.data
            self.released = -(-(table.ctypes.data - self.base) // mmap.PAGESIZE) * mmap.PAGESIZE

    def upto(self, block: np.ndarray) -> None:
        """The table has been copied up to the end of block (a view of its rows)."""
        if self.mm is None:
            return
        end = (block.ctypes.data - self.base + block.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self.released:
            try:
                self.mm.madvise(mmap.MADV_DONTNEED, self.released, end - self.released)
            except OSError:   # only memory: the copy is right either way
                self.mm = None
            self.released = end


def _mapping(a: np.ndarray) -> mmap.mmap | None:
    """The read-only mmap that a is a view of (map_file's), if any: there DONTNEED only drops
    pages, which read back the same (in a writable private mapping it would zero them)."""
    while isinstance(a, np.ndarray):
        a = a.base
    obj = a.obj if isinstance(a, memoryview) else a
    ok = isinstance(obj, mmap.mmap) and memoryview(obj).readonly and hasattr(mmap, "MADV_DONTNEED")
    return obj if ok else None


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


class Packed:
    """A weight matrix kept as its stored low-precision bits (a view of the file's mmap).

    Decode (a few rows of x) widens it in registers in the compiled GEMV; prefill in the
    compiled GEMM, panel by panel into each core's cache (never into an f32 matrix in memory).

    bits: [K, N] for an [in, out] matrix, or an embedding table [V, C] (gathered by `rows`; a
    tied LM head is its transpose, copied once at load: model._tied_head). dtype: "bf16" (uint16
    bits), "f16" (int16 view of the float16 bits) or "q8" (int8, with `scale`: one f32 per
    output channel, applied to the sums, or per row of an embedding table). A q8 matrix may be
    stored as pairs instead ([4, K8/8, N, 2], see `pairs` and `as_pairs`; k then says its K).
    """

    __array_ufunc__ = None   # so that `x @ packed` calls our __rmatmul__
    MATVEC_ROWS = 8          # up to this many rows (decode, small batches): the compiled GEMV

    def __init__(self, bits: np.ndarray, dtype: str, scale: np.ndarray | None = None, k: int | None = None):
        self.bits = bits.view(np.int16) if dtype == "f16" else bits
        self.dtype, self.scale = dtype, scale
        self.k = bits.shape[0] if k is None else k

    @property
    def shape(self) -> tuple[int, int]:
        """The logical [in, out] shape of the product x @ w."""
        return self.k, self.bits.shape[-2 if self.bits.ndim == 4 else 1]

    @property
    def pairable(self) -> bool:
        """Whether this is a q8 matrix that the kernels take stored as pairs: where the CPU
        multiplies int16 pairs, and N is a multiple of their vectors' lanes."""
        return self.dtype == "q8" and self.bits.ndim == 2 and kernels.PAIRS and self.shape[1] % kernels.LANES == 0

    def as_pairs(self, out: np.ndarray | None = None) -> "Packed":
        """This q8 matrix stored as pairs (a copy: `pairs`, into out where given); only where `pairable`."""
        return Packed(pairs(self.bits, out=out), "q8", self.scale, self.k)

    def rows(self, idx) -> np.ndarray:
        """Rows idx of an embedding table as float32 (the gather for token and position vectors)."""
        b = self.bits[idx]
        if self.dtype == "bf16":
            out = bf16_to_f32(b)
        elif self.dtype == "f16":
            out = b.view(np.float16).astype(np.float32)
        else:
            out = b.astype(np.float32) * self.scale[idx][..., None]
        return out

    def matmul(self, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """x [M, K] @ self (+ bias) -> [M, N] float32: the compiled GEMV up to MATVEC_ROWS rows
        (decode), else the compiled GEMM (prefill). Either widens the bits in registers and
        applies q8's per-channel scale and the bias as it stores the sums. bf16 prefill with MKL
        on a CPU with AMX-BF16 runs MKL's bf16 GEMM instead, x rounded to bf16 (blas.MKL.matmul_bf16)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[0] > self.MATVEC_ROWS and self.dtype == "bf16" and getattr(blas.active(), "amx_bf16", False):
            return blas.active().matmul_bf16(x, self.bits, bias)
        out = np.empty((x.shape[0], self.shape[1]), np.float32)
        scale = kernels.NONE if self.scale is None else self.scale
        bias = kernels.NONE if bias is None else bias
        if x.shape[0] <= self.MATVEC_ROWS:
            kernels.matvec(x, self.bits, out, scale, bias)
        else:
            kernels.gemm(x, self.bits, out, scale, bias)
        return out

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        """x [M, K] @ self -> [M, N] float32."""
        return self.matmul(x)
