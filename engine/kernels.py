"""Compiled kernels: GEMV (decode) and GEMM (prefill) over weights of any dtype, low-precision
ones converted in registers, never in memory; attention over a KV cache; layer norm, GELU.

A decode step reads every weight once, so its speed is bandwidth / bytes per weight: bf16 and
f16 weights read half the bytes of f32, int8 a quarter. BLAS has no fast half-precision GEMV on
most CPUs and NumPy's casts run near 1 GB/s, so these loops are compiled with numba, with
`parallel=True` over the numba threading layer that engine.blas picks.

Weights are passed as raw bits, their NumPy type saying what they hold: bf16 as uint16, f16 as
int16 (a view of the float16 bits), q8 as int8 (its per-output-channel scale applied after),
f32 as float32. All of decode runs on this one thread pool, and so do prefill's GEMMs over
low-precision weights (f32 weights' prefill GEMMs run on the BLAS).
f16 bits are widened exactly for every finite value (the converter refuses weights that
overflow f16), subnormals included.
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import carray, njit, prange
from numba.core import types
from numba.extending import intrinsic, overload

from . import threads


def _full_width_vectors() -> None:
    """Let LLVM vectorize loops with the CPU's widest registers. On Intel's AVX-512 CPUs
    (Skylake-SP to Emerald Rapids) LLVM prefers 256-bit vectors in the loops it vectorizes, so
    the decode GEMVs ran on half-width registers there (Xeon, Emerald Rapids, 2 threads,
    GPT-2-small decode interleaved: f32 +5%, bf16 +15%, f16 +17%, q8 +17% with 512-bit ones).
    It must run before numba's CPU target exists (its first @njit); not where NUMBA_CPU_NAME
    or NUMBA_CPU_FEATURES already say what to compile for; a no-op on CPUs without the
    preference (AMD's, AVX2-only ones)."""
    import numba
    from numba.core.codegen import get_host_cpu_features

    if numba.config.CPU_NAME is None and numba.config.CPU_FEATURES is None:
        features = get_host_cpu_features()
        if "+avx512f" in features.split(","):
            numba.config.CPU_FEATURES = features + ",-prefer-256-bit"


_full_width_vectors()

F32 = np.float32
LAYERS = {"openmp": "omp", "tbb": "tbb", "sequential": "workqueue"}  # our names -> numba's


def set_threading_layer(threading: str | None) -> None:
    """Pick numba's threading layer before any kernel runs (None: numba's default order)."""
    import ctypes

    import numba

    from .blas import find_library
    from .errors import GptcpuError

    if threading is None:
        return
    if threading == "tbb":  # numba finds TBB only if it is loaded (pip's tbb is not on the loader path)
        tbb = find_library("libtbb.so.12")
        if tbb is None:
            raise GptcpuError("the tbb threading layer needs TBB: pip install tbb")
        ctypes.CDLL(tbb, mode=ctypes.RTLD_GLOBAL)
    numba.config.THREADING_LAYER = LAYERS[threading]


def threading_layer() -> str:
    """The layer in effect ('not started' until the first parallel kernel has run)."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:
        return "not started"


SMALL = 512 << 10  # matvec: matrices up to this size are split by columns (they stay in L2)
CHUNK = 1024  # matvec: at most this many columns of eight weight rows kept in L1 (32 KB at f32)
#               while every row of x uses them; a row splits into chunks of equal width


def _bitcast(to, frm):
    """An intrinsic reinterpreting a `frm` scalar's bits as a `to` of the same size."""
    @intrinsic
    def cast(typingctx, v):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(to))

        return to(frm), codegen

    return cast


_bits_to_f32 = _bitcast(types.float32, types.uint32)
_f32_bits = _bitcast(types.uint32, types.float32)


@intrinsic
def _writable(typingctx, a):
    """The array a typed as a writable one (the same array: the kernels never write weights).
    numba compiles a function once per type of each argument, and a read-only array (a view of
    a file's mmap: weights, q8 scales, biases) is a type of its own: the GEMV compiled again
    for each mix of read-only and writable w, scale and bias, 19-32 s each (cold cache), eleven
    of them in the test suite."""
    if not isinstance(a, types.Array):
        return None
    ty = a.copy(readonly=False)

    def codegen(context, builder, signature, args):
        from numba.core.imputils import impl_ret_borrowed
        return impl_ret_borrowed(context, builder, ty, args[0])

    return ty(a), codegen


def widen(v):
    """One stored weight -> float32, by its storage type (resolved at compile time)."""


def _host_has_f16c() -> bool:
    if os.environ.get("GPTCPU_NO_F16C"):  # force the portable path (its test uses this)
        return False
    try:
        from llvmlite import binding
        return bool(binding.get_host_cpu_features().get("f16c", False))
    except Exception:
        return False


_F16C = _host_has_f16c()  # without it LLVM would call a runtime helper numba may not link


@intrinsic
def _half_bits_to_f32(typingctx, h):
    """IEEE half bits (int16) -> float32 by LLVM's own half type: one vcvtph2ps where the CPU has
    F16C, exact for every value."""
    sig = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@overload(widen, inline="always")
def _widen(v):
    if v == types.float32:    # f32 weights (small batches: one pass over the weights for all rows)
        return lambda v: v
    if v == types.int8:       # q8 (the scale is applied to the sum)
        return lambda v: np.float32(v)
    if v == types.uint16:     # bf16: the top half of an f32
        return lambda v: _bits_to_f32(np.uint32(v) << np.uint32(16))
    if v == types.int16 and _F16C:  # f16 bits, converted by the hardware
        return lambda v: _half_bits_to_f32(v)
    if v == types.int16:            # f16 bits: exponent and mantissa into f32 place, then * 2^112
        def f16(v):
            u = np.uint32(np.uint16(v))
            bits = ((u & np.uint32(0x7FFF)) << np.uint32(13)) | ((u & np.uint32(0x8000)) << np.uint32(16))
            return _bits_to_f32(bits) * np.float32(5.192296858534828e33)
        return f16
    return None


F16_MAX = 65504.0   # the largest finite half: a key or value beyond it is stored as this


@intrinsic
def _f32_to_half_bits(typingctx, v):
    """float32 -> IEEE half bits (int16), rounded to nearest even by LLVM's own half type: one
    vcvtps2ph where the CPU has F16C."""
    sig = types.int16(types.float32)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


def store(a, i, v):
    """a[i] = v, a float32 narrowed to a's storage type (resolved at compile time): float32 as
    is; int16 holds f16 bits (the f16 KV cache), rounded to nearest even and clamped to
    +-65504 (an overflow stored as infinity would turn every later softmax into NaN)."""


@overload(store, inline="always")
def _store(a, i, v):
    if a.dtype == types.float32:
        def f32(a, i, v):
            a[i] = v
        return f32
    if a.dtype == types.int16 and _F16C:
        def f16(a, i, v):
            a[i] = _f32_to_half_bits(min(max(v, np.float32(-F16_MAX)), np.float32(F16_MAX)))
        return f16
    if a.dtype == types.int16:
        def f16_portable(a, i, v):
            u = _f32_bits(min(max(v, np.float32(-F16_MAX)), np.float32(F16_MAX)))
            sign = (u >> np.uint32(16)) & np.uint32(0x8000)
            m = u & np.uint32(0x7FFFFFFF)
            if m > np.uint32(0x7F800000):      # NaN stays NaN
                h = sign | np.uint32(0x7E00)
            elif m < np.uint32(0x38800000):    # below 2^-14: a subnormal half, in units of 2^-24
                h = sign | np.uint32(np.rint(_bits_to_f32(m) * np.float32(16777216.0)))
            else:                              # rebias the exponent, round 23 -> 10 bits to even
                m += np.uint32(0xFFF) + ((m >> np.uint32(13)) & np.uint32(1))
                h = sign | ((m - np.uint32(0x38000000)) >> np.uint32(13))
            a[i] = np.int16(np.uint16(h))
        return f16_portable
    return None


@intrinsic
def _prefetch(typingctx, a, i):
    """Ask for the cache line holding a[i] (into L1; a hint: it never faults, whatever i)."""
    sig = types.void(a, i)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        from numba.core import cgutils

        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, args[1:], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])   # read, keep in L1, data
        return context.get_dummy_value()

    return sig, codegen


def prefetch_line(w):
    """Weights per cache line where the one-row GEMV prefetches w ahead (1- and 2-byte
    weights), else 0; a compile-time constant, so the loop over a line vectorizes."""


@overload(prefetch_line, inline="always")
def _prefetch_line(w):
    if w.dtype == types.int8:
        return lambda w: 64
    if w.dtype in (types.uint16, types.int16):
        return lambda w: 32
    return lambda w: 0


def _vector_rows(w):
    """Whether _eight_rows_vec takes w's dtype (all but f16 without F16C); a compile-time constant."""


@overload(_vector_rows, inline="always")
def _vector_rows_impl(w):
    ok = w.dtype != types.int16 or _F16C
    return lambda w: ok


NONE = np.empty(0, np.float32)   # matvec: no scale, no bias


def matvec(x, w, out, scale=NONE, bias=NONE):
    """out[M, N] = x[M, K] @ w[K, N] (* scale[N]) (+ bias[N]) for a small M (decode), w in its
    stored bits; q8's per-channel scale and the bias are applied as the sums are stored (two
    NumPy passes fewer a matrix: GPT-2-small q8 3.58 -> 3.49 and 3.41 -> 3.37 ms a token, bf16
    6.56 -> 6.52; the same logits, bit for bit, as multiplying, then adding, after).

    Each of the T threads streams a contiguous range of whole rows of w, eight at a time, and
    the partial sums are added at the end; with several rows of x the weights are read once for
    all of them (GPT-2-small f32, M=2: 8.2 ms against 17.1 reading them once per row), and
    widened once for every four rows (_four_rows; decode at batch 4, alternating in one process
    on a 2-core Xeon: GPT-2 small f32 1.06x, bf16 1.12x, f16 1.18x, q8 1.37x, GPT-J width bf16
    1.59x, q8 1.55x; the same tokens). A matrix
    small enough to stay in a core's L2 is split by columns instead, each thread owning N/T
    columns of every row: 4 us a call against 10 for the rows at the demo model's 128-wide
    matrices, where the partial sums cost more than the matrix. The split depends on w and T
    only, never on M, and each splits the sums the same way for every row of x: a sequence's
    numbers are bit for bit the same alone or in a decode batch (a column split at one row and
    a row split at several, as before, moved them).

    At one row of x, int8 and 16-bit weights are read a cache line per row at a time, each line
    with a software prefetch of the line it will need one chunk later. Their widening costs
    enough instructions per byte that the core's out-of-order window covered under 2 KB of
    weights ahead, and the hardware prefetchers stop at every 4 KB page: streaming from memory
    the 49 matrices of GPT-2-small went at 24-27 GB/s at q8, where np.max reads ~50 (q8 with
    prefetches: 36-44 GB/s; bf16 36 -> 40; GPT-J-width q8 35 -> 41; f32, whose loads alone keep
    the window full, lost ~12% to them and goes without). Prefetching changes no sum.
    Each line's vectors are summed by _eight_rows_vec, not by the loop vectorizer, whose
    overlap checks before every line cost as many instructions as the arithmetic: on AMD Zen 5,
    where memory holds the step, that changed nothing; on a 2-core Xeon (Emerald Rapids) decode
    bf16 and f16 went 1.75-1.87x -> 1.92-1.98x f32 (GPT-2 small, interleaved), q8 level (there
    a q8 GEMV with a third of the instructions, on vpdpbusd, was level too: README).

    q8 weights, where the CPU multiplies int16 pairs, go against x rounded to int16 as in the
    prefill GEMM (_matvec_pairs), the same for every row count; other q8 shapes (N not a
    multiple of LANES, K of 8) and the small matrices keep f32 x.
    """
    _matvec(x, w, out, threads.kernel_threads(), scale, bias)


@njit(cache=True, nogil=True, boundscheck=False)
def _matvec(x, w, out, T, scale, bias):   # matvec on T threads (compiled: the decode blocks call it too)
    _matvec_split(_writable(x), _writable(w), out, T, _writable(scale), _writable(bias))


def _matvec_split(x, w, out, T, scale, bias):
    """matvec's choice of kernel: a small matrix split by columns, a large one by rows, q8
    weights on int16 pairs where they apply (always for weights stored as pairs)."""


@overload(_matvec_split, inline="always")
def _matvec_split_impl(x, w, out, T, scale, bias):
    if w.ndim == 4:
        def pairs(x, w, out, T, scale, bias):
            if w.nbytes <= SMALL:
                _matvec_cols_pairs(x, w, out, T, scale, bias)
            else:
                _matvec_pairs(x, w, out, T, scale, bias)
        return pairs

    def rows(x, w, out, T, scale, bias):
        if w.nbytes <= SMALL:
            _matvec_cols(x, w, out, T, scale, bias)
        elif not _matvec_int16_x(x, w, out, T, scale, bias):
            _matvec_rows(x, w, out, T, scale, bias)
    return rows


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True, inline="always")
def _epilogue(s, scale, bias, j):   # a stored sum: times its scale, plus its bias (either may be empty)
    if scale.size:
        s *= scale[j]
    if bias.size:
        s += bias[j]
    return s


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True, inline="always")
def _chunk_width(N):
    """The row split's chunk of columns: equal chunks of at most CHUNK, whole lines (GPT-2's 2304
    columns: 3 x 768, not 1024 + 1024 + 256), so that the prefetch of the next chunk, or of the
    next rows' first, covers exactly what comes next: with a short last chunk, the next rows'
    first went unfetched (GPT-2-small q8 w_qkv 54 -> 42 us a call, decode 4.01 -> 3.85 ms a
    token, interleaved in one process)."""
    chunks = (N + CHUNK - 1) // CHUNK
    return ((N + chunks - 1) // chunks + 63) // 64 * 64


def _next_rows(w, k, c0, width):
    """What the row split reads after columns c0:c0+width of rows k..k+7: these rows' next
    chunk, or the next eight rows' first; as eight views from there whose element j is in the
    line to prefetch for column j (w [K, N]: the eight rows; w stored as pairs, [4, K/8, N, 2]:
    the four pair rows, one in each stripe, each as two views of its pairs' first bytes, from
    its first line and its second: slices, where a reshape to a flat row would be a call out
    of line)."""


@overload(_next_rows, inline="always")
def _next_rows_impl(w, k, c0, width):
    if w.ndim == 4:
        def pairs(w, k, c0, width):
            G, N = w.shape[1], w.shape[2]
            g, cp = (k // 8, c0 + width) if c0 + width < N else (min(k // 8 + 1, G - 1), 0)
            return (w[0, g, cp:, 0], w[0, g, cp + 32:, 0], w[1, g, cp:, 0], w[1, g, cp + 32:, 0],
                    w[2, g, cp:, 0], w[2, g, cp + 32:, 0], w[3, g, cp:, 0], w[3, g, cp + 32:, 0])
        return pairs

    def rows(w, k, c0, width):
        K, N = w.shape
        kp, cp = (k, c0 + width) if c0 + width < N else (min(k + 8, K - 8), 0)
        return (w[kp, cp:], w[kp + 1, cp:], w[kp + 2, cp:], w[kp + 3, cp:],
                w[kp + 4, cp:], w[kp + 5, cp:], w[kp + 6, cp:], w[kp + 7, cp:])
    return rows


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True, inline="always")
def _prefetch_eight(p0, p1, p2, p3, p4, p5, p6, p7, j):   # the line at j of each of eight rows
    _prefetch(p0, j)
    _prefetch(p1, j)
    _prefetch(p2, j)
    _prefetch(p3, j)
    _prefetch(p4, j)
    _prefetch(p5, j)
    _prefetch(p6, j)
    _prefetch(p7, j)


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True, inline="always")
def _zero(acc):   # acc [M, N] = 0 (a loop: np.zeros or acc[:] = 0 would be a parallel loop of their own)
    for m in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            acc[m, j] = 0


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True, inline="always")
def _add_parts(part, out, scale, bias):
    """out[m, j] = part[0, m, j] + part[1, m, j] + ..., in that order, then its epilogue (loops:
    `out += part[t]` would be a parallel loop of its own, one more fork-join a call). Two parts
    (two threads) in one pass that LLVM vectorizes: the loop over t kept it scalar (GPT-2-small
    shapes, hot: 5.7 -> 3.3 us at 2,304 columns, the same bits). (More parts, as a pass each
    with out written then read back, ran 15-25x slower than the scalar loop, kept for them.)"""
    T, M, N = part.shape
    for m in range(M):
        if T == 2:
            o, first, last = out[m], part[0, m], part[1, m]
            for j in range(N):
                o[j] = _epilogue(first[j] + last[j], scale, bias, j)
            continue
        for j in range(N):
            s = part[0, m, j]
            for t in range(1, T):
                s += part[t, m, j]
            out[m, j] = _epilogue(s, scale, bias, j)


@njit(parallel=True, fastmath=True, boundscheck=False, cache=True, nogil=True)
def _matvec_cols(x, w, out, threads, scale, bias):
    """matvec, each thread owning a contiguous range of columns (a multiple of 16)."""
    M, K = x.shape
    N = w.shape[1]
    step = ((N + threads - 1) // threads + 15) // 16 * 16
    for t in prange(threads):
        n0, n1 = t * step, min(N, t * step + step)
        if n1 <= n0:
            continue
        for m in range(M):
            acc = np.zeros(n1 - n0, np.float32)
            k = 0
            while k + 8 <= K:
                x0, x1, x2, x3 = x[m, k], x[m, k + 1], x[m, k + 2], x[m, k + 3]
                x4, x5, x6, x7 = x[m, k + 4], x[m, k + 5], x[m, k + 6], x[m, k + 7]
                r0, r1, r2, r3 = w[k, n0:n1], w[k + 1, n0:n1], w[k + 2, n0:n1], w[k + 3, n0:n1]
                r4, r5, r6, r7 = w[k + 4, n0:n1], w[k + 5, n0:n1], w[k + 6, n0:n1], w[k + 7, n0:n1]
                for j in range(n1 - n0):
                    acc[j] += (x0 * widen(r0[j]) + x1 * widen(r1[j]) + x2 * widen(r2[j]) + x3 * widen(r3[j])
                               + x4 * widen(r4[j]) + x5 * widen(r5[j]) + x6 * widen(r6[j]) + x7 * widen(r7[j]))
                k += 8
            while k < K:
                x0, r0 = x[m, k], w[k, n0:n1]
                for j in range(n1 - n0):
                    acc[j] += x0 * widen(r0[j])
                k += 1
            for j in range(n1 - n0):
                out[m, n0 + j] = _epilogue(acc[j], scale, bias, n0 + j)


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True)
def _four_rows(x, m, k, r0, r1, r2, r3, r4, r5, r6, r7, acc, c0, c1):
    """acc[m + i, c0:c1] += x[m + i, k:k + 8] @ the eight rows r0..r7 (columns c0:c1 of w's rows
    k..k + 7), for i < 4, each weight widened once for the four: the same sum per row, in the
    same order, as one row alone."""
    x00, x01, x02, x03, x04, x05, x06, x07 = (x[m, k], x[m, k + 1], x[m, k + 2], x[m, k + 3],
                                              x[m, k + 4], x[m, k + 5], x[m, k + 6], x[m, k + 7])
    x10, x11, x12, x13, x14, x15, x16, x17 = (x[m + 1, k], x[m + 1, k + 1], x[m + 1, k + 2], x[m + 1, k + 3],
                                              x[m + 1, k + 4], x[m + 1, k + 5], x[m + 1, k + 6], x[m + 1, k + 7])
    x20, x21, x22, x23, x24, x25, x26, x27 = (x[m + 2, k], x[m + 2, k + 1], x[m + 2, k + 2], x[m + 2, k + 3],
                                              x[m + 2, k + 4], x[m + 2, k + 5], x[m + 2, k + 6], x[m + 2, k + 7])
    x30, x31, x32, x33, x34, x35, x36, x37 = (x[m + 3, k], x[m + 3, k + 1], x[m + 3, k + 2], x[m + 3, k + 3],
                                              x[m + 3, k + 4], x[m + 3, k + 5], x[m + 3, k + 6], x[m + 3, k + 7])
    a0, a1, a2, a3 = acc[m, c0:c1], acc[m + 1, c0:c1], acc[m + 2, c0:c1], acc[m + 3, c0:c1]
    for j in range(c1 - c0):
        w0, w1, w2, w3 = widen(r0[j]), widen(r1[j]), widen(r2[j]), widen(r3[j])
        w4, w5, w6, w7 = widen(r4[j]), widen(r5[j]), widen(r6[j]), widen(r7[j])
        a0[j] += x00 * w0 + x01 * w1 + x02 * w2 + x03 * w3 + x04 * w4 + x05 * w5 + x06 * w6 + x07 * w7
        a1[j] += x10 * w0 + x11 * w1 + x12 * w2 + x13 * w3 + x14 * w4 + x15 * w5 + x16 * w6 + x17 * w7
        a2[j] += x20 * w0 + x21 * w1 + x22 * w2 + x23 * w3 + x24 * w4 + x25 * w5 + x26 * w6 + x27 * w7
        a3[j] += x30 * w0 + x31 * w1 + x32 * w2 + x33 * w3 + x34 * w4 + x35 * w5 + x36 * w6 + x37 * w7


@njit(parallel=True, fastmath=True, boundscheck=False, cache=True, nogil=True)
def _matvec_rows(x, w, out, threads, scale, bias):
    """matvec, each thread streaming a contiguous range of rows front to back, eight rows at a
    time in column chunks that stay in L1 while every row of x uses them; partial sums added."""
    M, K = x.shape
    N = w.shape[1]
    T = min(threads, max(1, K // 16))
    # np.zeros, and `out += part[t]` (see _zero, _add_parts), would each be a parallel loop of
    # their own: three fork-joins a call, not one (GPT-2-small q8 4.15 -> 4.04 ms a token)
    part = np.empty((T, M, N), np.float32)
    step = (K + T - 1) // T
    line = prefetch_line(w)
    ahead = line > 0 and M == 1
    width = _chunk_width(N)
    for t in prange(T):
        k, k1 = t * step, min(K, t * step + step)
        acc = part[t]
        _zero(acc)
        while k + 8 <= k1:
            for c0 in range(0, N, width):
                c1 = min(N, c0 + width)
                r0, r1, r2, r3 = w[k, c0:c1], w[k + 1, c0:c1], w[k + 2, c0:c1], w[k + 3, c0:c1]
                r4, r5, r6, r7 = w[k + 4, c0:c1], w[k + 5, c0:c1], w[k + 6, c0:c1], w[k + 7, c0:c1]
                if ahead:  # the same sums, a line of each row at a time, each with its prefetch
                    # of what comes next: these rows' next chunk, or the next eight rows' first
                    x0, x1, x2, x3 = x[0, k], x[0, k + 1], x[0, k + 2], x[0, k + 3]
                    x4, x5, x6, x7 = x[0, k + 4], x[0, k + 5], x[0, k + 6], x[0, k + 7]
                    p0, p1, p2, p3, p4, p5, p6, p7 = _next_rows(w, k, c0, width)
                    a = acc[0, c0:c1]
                    jb = 0
                    while jb + line <= c1 - c0:
                        _prefetch_eight(p0, p1, p2, p3, p4, p5, p6, p7, jb)
                        if _vector_rows(w):
                            for j in range(jb, jb + line, LANES):
                                _eight_rows_vec(w, k, c0 + j, x, a, j)
                        else:
                            for j in range(jb, jb + line):
                                a[j] += (x0 * widen(r0[j]) + x1 * widen(r1[j]) + x2 * widen(r2[j]) + x3 * widen(r3[j])
                                         + x4 * widen(r4[j]) + x5 * widen(r5[j]) + x6 * widen(r6[j]) + x7 * widen(r7[j]))
                        jb += line
                    for j in range(jb, c1 - c0):
                        a[j] += (x0 * widen(r0[j]) + x1 * widen(r1[j]) + x2 * widen(r2[j]) + x3 * widen(r3[j])
                                 + x4 * widen(r4[j]) + x5 * widen(r5[j]) + x6 * widen(r6[j]) + x7 * widen(r7[j]))
                    continue   # (not the loop below from column jb: LLVM stopped vectorizing it, 14x slower)
                m = 0
                while m + 4 <= M:   # four rows of x a pass: each weight loaded and widened once for them
                    _four_rows(x, m, k, r0, r1, r2, r3, r4, r5, r6, r7, acc, c0, c1)
                    m += 4
                for m in range(m, M):
                    x0, x1, x2, x3 = x[m, k], x[m, k + 1], x[m, k + 2], x[m, k + 3]
                    x4, x5, x6, x7 = x[m, k + 4], x[m, k + 5], x[m, k + 6], x[m, k + 7]
                    a = acc[m, c0:c1]
                    for j in range(c1 - c0):
                        a[j] += (x0 * widen(r0[j]) + x1 * widen(r1[j]) + x2 * widen(r2[j]) + x3 * widen(r3[j])
                                 + x4 * widen(r4[j]) + x5 * widen(r5[j]) + x6 * widen(r6[j]) + x7 * widen(r7[j]))
            k += 8
        while k < k1:
            r0 = w[k]
            for m in range(M):
                x0, a = x[m, k], acc[m]
                for j in range(N):
                    a[j] += x0 * widen(r0[j])
            k += 1
    _add_parts(part, out, scale, bias)


def _splat(builder, v, n=None):
    """IR: the scalar v in every lane of an n-vector (LANES if not given): a broadcast."""
    from llvmlite import ir

    n = n or LANES
    ty, i32 = ir.VectorType(v.type, n), ir.IntType(32)
    return builder.shuffle_vector(builder.insert_element(ir.Constant(ty, ir.Undefined), v, i32(0)),
                                  ir.Constant(ty, ir.Undefined), ir.Constant(ir.VectorType(i32, n), [0] * n))


def _pair_mac(builder):
    """IR: -> mac(acc, w, x): acc plus the products of the int16 pairs of w and x (LANES int32s
    each, two int16s in each int32), summed pairwise into acc's int32 lanes: one vpdpwssd with
    VNNI, else one pmaddwd and an add (AVX-512BW, AVX2)."""
    from llvmlite import ir
    from numba.core import cgutils

    ivec, hvec = ir.VectorType(ir.IntType(32), LANES), ir.VectorType(ir.IntType(16), 2 * LANES)
    if VNNI:
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ivec, [ivec] * 3),
                                             "llvm.x86.avx512.vpdpwssd.512")
        return lambda acc, w, x: builder.call(dot, [acc, w, x])
    name = "llvm.x86.avx512.pmaddw.d.512" if LANES == 16 else "llvm.x86.avx2.pmadd.wd"
    pmadd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ivec, [hvec] * 2), name)
    return lambda acc, w, x: builder.add(acc, builder.call(pmadd, [builder.bitcast(w, hvec), builder.bitcast(x, hvec)]))


def _pairs_of_rows(R):
    """-> the intrinsic that adds to acc[m + r, j:j+LANES], for r < R, the eight int8 weight
    rows k..k+7 (columns j:j+LANES of w) times x's row m + r as int16 pairs (xq, KP int32s a
    row; see _quantize_row) and its block's scale (xs, nkb a row): the weights of rows k and
    k+1 interleaved into int16 pairs once for the R rows of x (w [K, N]: two loads and a
    shuffle; w stored as pairs [4, K/8, N, 2], weights.pairs: one load), four vpdpwssd (pmaddwd
    and an add without VNNI) into exact integer sums, then acc += float(sum) * scale in one FMA. The
    scale is a power of two, so that product is exact and the FMA rounds once: the same bits
    for a row alone (R = 1) and in a group of four (R = 4)."""

    @intrinsic
    def pairs(typingctx, w, k, j, xq, kp, xs, nkb, acc, m):
        sig = types.void(w, k, j, xq, kp, xs, nkb, acc, m)

        def codegen(context, builder, signature, args):
            from llvmlite import ir
            from numba.core import cgutils

            wty, _, _, qty, _, sty, _, aty, _ = signature.args
            W = context.make_array(wty)(context, builder, args[0])
            A = context.make_array(aty)(context, builder, args[7])
            XQ = context.make_array(qty)(context, builder, args[3]).data
            XS = context.make_array(sty)(context, builder, args[5]).data
            i64, i32, i16, i8 = ir.IntType(64), ir.IntType(32), ir.IntType(16), ir.IntType(8)
            ivec, fvec = ir.VectorType(i32, LANES), ir.VectorType(ir.FloatType(), LANES)
            mac = _pair_mac(builder)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fvec, [fvec] * 3), f"llvm.fma.v{LANES}f32")
            const = (lambda n: ir.Constant(i64, n))

            k, j, kp, nkb, m = (builder.sext(a, i64) if a.type.width < 64 else a for a in
                                (args[1], args[2], args[4], args[6], args[8]))
            half, blk = builder.sdiv(k, const(2)), builder.sdiv(k, const(KC))
            mix = ir.Constant(ir.VectorType(i32, 2 * LANES), [v for n in range(LANES) for v in (n, n + LANES)])
            wp = []
            for p in range(4):   # rows k + 2p and k + 2p + 1 as LANES int16 pairs
                if wty.ndim == 4:   # stored as pairs (weights.pairs): one load, one widening
                    # (pair row k/2 + p: stripe p's row k/8, at (p * G + k/8) * 2N + 2j: numba's index into
                    # [4, G, N, 2] multiplies by the runtime 2, and LLVM kept 16 addresses apart, on the
                    # stack; 20-40% slower hot)
                    _, G, N2, _ = cgutils.unpack_tuple(builder, W.shape)
                    row = builder.mul(builder.add(builder.mul(const(p), G), builder.sdiv(k, const(8))), builder.mul(N2, const(2)))
                    ptr = builder.gep(W.data, [builder.add(row, builder.mul(j, const(2)))])
                    v = builder.load(builder.bitcast(ptr, ir.VectorType(i8, 2 * LANES).as_pointer()), align=1)
                    wp.append(builder.sext(v, ir.VectorType(i16, 2 * LANES)))
                    continue
                rows = []
                for h in range(2):
                    ptr = cgutils.get_item_pointer(context, builder, wty, W, [builder.add(k, const(2 * p + h)), j],
                                                   wraparound=False)
                    v = builder.load(builder.bitcast(ptr, ir.VectorType(i8, LANES).as_pointer()), align=1)
                    rows.append(builder.sext(v, ir.VectorType(i16, LANES)))
                wp.append(builder.shuffle_vector(rows[0], rows[1], mix))
            for r in range(R):
                mr = builder.add(m, const(r))
                isum = ir.Constant(ivec, [0] * LANES)
                for p in range(4):
                    xv = builder.load(builder.gep(XQ, [builder.add(builder.add(builder.mul(mr, kp), half), const(p))]),
                                      align=4)
                    isum = mac(isum, builder.bitcast(wp[p], ivec), _splat(builder, xv))
                sv = _splat(builder, builder.load(builder.gep(XS, [builder.add(builder.mul(mr, nkb), blk)]), align=4))
                pa = builder.bitcast(cgutils.get_item_pointer(context, builder, aty, A, [mr, j], wraparound=False),
                                     fvec.as_pointer())
                builder.store(builder.call(fma, [builder.sitofp(isum, fvec), sv, builder.load(pa, align=4)]), pa, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return pairs


_pairs_1, _pairs_4 = _pairs_of_rows(1), _pairs_of_rows(4)


def _matvec_int16_x(x, w, out, T, scale, bias):
    """Run matvec as _matvec_pairs where it applies (q8 weights, a CPU that multiplies int16
    pairs, N a multiple of LANES and K of 8: a property of w alone) -> whether it ran."""


@overload(_matvec_int16_x)
def _matvec_int16_x_impl(x, w, out, T, scale, bias):
    if w.dtype != types.int8 or not PAIRS:
        return lambda x, w, out, T, scale, bias: False

    def run(x, w, out, T, scale, bias):
        if w.shape[1] % LANES or w.shape[0] % 8:
            return False
        _matvec_pairs(x, w, out, T, scale, bias)
        return True
    return run


@njit(parallel=True, fastmath=True, boundscheck=False, cache=True, nogil=True)
def _matvec_pairs(x, w, out, threads, scale, bias):
    """_matvec_rows for q8 weights against x rounded to int16 as the q8 GEMM does (_quantize_row:
    per row and KC-block, a power-of-two scale, at most 2^-15 of the block's largest |x| lost),
    the integer products summed eight rows at a time (_pairs_1, _pairs_4): where _matvec_rows
    widens every weight to f32 for one FMA each, two weights go into each lane of one vpdpwssd.
    Decode and prefill then round x the same way. The same split (rows in multiples of eight a
    thread), chunks and prefetches as _matvec_rows; each row's sums the same bits alone or with
    others. On q8 stored as pairs (weights.pairs) the eight rows are a pair row from each of the
    four stripes: each thread streams four ranges in order. Against _matvec_rows, in one
    process, alternating, 64 MB read before each step
    (2-core Xeon, Emerald Rapids): GPT-2-small q8 decode 1.11-1.14x at batch 1, 1.11x at
    batch 4, GPT-J width 1.23x; the same greedy tokens. GPT-2-small's 48 GEMVs alone, from
    memory: 1.15-1.21x (its prototype)."""
    M, K = x.shape
    N = out.shape[1]
    T = min(threads, max(1, K // 16))
    xq, xs, KP, nkb = _quantize_rows(x)
    part = np.empty((T, M, N), np.float32)
    K = (K + 7) // 8 * 8   # as pairs, w's rows past x's K are zeros
    step = ((K + T - 1) // T + 7) // 8 * 8
    ahead = M == 1
    width = _chunk_width(N)
    for t in prange(T):
        k, k1 = t * step, min(K, t * step + step)
        acc = part[t]
        _zero(acc)
        while k + 8 <= k1:
            for c0 in range(0, N, width):
                c1 = min(N, c0 + width)
                if ahead:   # a line of each row at a time, with its prefetch of what comes next (matvec)
                    p0, p1, p2, p3, p4, p5, p6, p7 = _next_rows(w, k, c0, width)
                    jb = 0
                    while jb + 64 <= c1 - c0:
                        _prefetch_eight(p0, p1, p2, p3, p4, p5, p6, p7, jb)
                        for j in range(c0 + jb, c0 + jb + 64, LANES):
                            _pairs_1(w, k, j, xq, KP, xs, nkb, acc, 0)
                        jb += 64
                    for j in range(c0 + jb, c1, LANES):
                        _pairs_1(w, k, j, xq, KP, xs, nkb, acc, 0)
                    continue
                m = 0
                while m + 4 <= M:
                    for j in range(c0, c1, LANES):
                        _pairs_4(w, k, j, xq, KP, xs, nkb, acc, m)
                    m += 4
                for m in range(m, M):
                    for j in range(c0, c1, LANES):
                        _pairs_1(w, k, j, xq, KP, xs, nkb, acc, m)
            k += 8
    _add_parts(part, out, scale, bias)


@njit(parallel=True, fastmath=True, boundscheck=False, cache=True, nogil=True)
def _matvec_cols_pairs(x, w, out, threads, scale, bias):
    """_matvec_cols for q8 weights stored as pairs ([4, K/8, N, 2], N a multiple of LANES): each
    thread owns a range of columns (a multiple of LANES), against x rounded to int16 as in
    _matvec_pairs; each row of x the same sums alone or with others."""
    M, N = out.shape
    K = (x.shape[1] + 7) // 8 * 8   # (w's rows past x's K are zeros)
    xq, xs, KP, nkb = _quantize_rows(x)
    acc = np.empty((M, N), np.float32)
    step = ((N + threads - 1) // threads + LANES - 1) // LANES * LANES
    for t in prange(threads):
        n0, n1 = t * step, min(N, t * step + step)
        for m in range(M):
            for j in range(n0, n1):
                acc[m, j] = 0
        for k in range(0, K, 8):
            for j in range(n0, n1, LANES):
                m = 0
                while m + 4 <= M:   # each weight loaded and widened once for four rows of x
                    _pairs_4(w, k, j, xq, KP, xs, nkb, acc, m)
                    m += 4
                for m in range(m, M):
                    _pairs_1(w, k, j, xq, KP, xs, nkb, acc, m)
        for m in range(M):
            for j in range(n0, n1):
                out[m, j] = _epilogue(acc[m, j], scale, bias, j)


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True, inline="always")
def _exp(x):
    """e^x for x <= 0 (softmax's scores less their largest) in a form LLVM vectorizes: 2^n 2^f
    with y = x log2(e), n = y rounded, 2^f on [-1/2, 1/2] by its Taylor series to degree 6
    (truncation < 1.2e-7 relative), 2^n added to the exponent's bits; below -87, ~2^-126 (not
    0). Within 1.7e-7 of e^x absolute, as NumPy's float32 exp is within 1.2e-7: what matters
    in a softmax whose largest term is 1 (relative, y's rounding costs up to 4e-6 near -87;
    tests/test_kernels.py). np.exp, a scalar call per position, took ~1/6 of attend_decode."""
    y = max(x, np.float32(-87.0)) * np.float32(1.4426950408889634)
    n = np.floor(y + np.float32(0.5))
    f = y - n
    e = np.float32(1.5403530393381606e-04)
    e = e * f + np.float32(1.3333558146428443e-03)
    e = e * f + np.float32(9.6181291076284772e-03)
    e = e * f + np.float32(5.5504108664821580e-02)
    e = e * f + np.float32(2.4022650695910071e-01)
    e = e * f + np.float32(6.9314718055994531e-01)
    e = e * f + np.float32(1.0)
    return _bits_to_f32(_f32_bits(e) + (np.uint32(np.int32(n)) << np.uint32(23)))


@njit(parallel=True, fastmath=True, boundscheck=False, cache=True, nogil=True)
def attend_decode(q, k, v, K, V, slots, ends, scale, out):
    """One new token per sequence, attending over its slot of a KV cache: the decode step of a
    continuous batch, every (sequence, head) a parallel task.

    q, k, v [n, H, D]: the new tokens' query, key and value; K, V [slots, H, capacity, D]: the
    cache (float32, or int16 holding f16 bits), where row r's key and value are written at
    position ends[r] - 1 of slot slots[r] before it attends over positions 0:ends[r]; out
    [n, H, D]. Where NumPy would make 2 x n x H small GEMM calls over a zero-padded, masked
    batch, this reads each cached key and value once (GPT-2-small, 8 sequences of ~150 tokens,
    2 threads: see engine.model._attend_slots). Keys and values are prefetched 8 positions
    ahead (the dot products and the horizontal sum per position keep the window short, as in
    matvec): GPT-2-small q8 decode spent 0.47 ms a token here, against 0.55 without. Each task
    also asks for the next task's keys and values, a position of each per position it reads:
    only a thread's first task then waits on memory (GPT-2-small q8, ~190 positions: 0.40 ->
    0.30 ms a token, cold in a micro-benchmark 34 -> 25 us a layer; GPT-J's width level).
    Scores four positions at a time (four sums in flight, one horizontal add each), `_exp`
    for np.exp and values two positions at a time: GPT-2-small's 12 heads, 192 positions, f16,
    2 threads, hot: 47-56 -> 31-33 us a layer.
    """
    n, H, D = q.shape
    step = 64 // K.itemsize   # elements per cache line: 32 at f16, 16 at f32
    for task in prange(n * H):
        r, h = task // H, task % H
        s, L = slots[r], ends[r]
        Ks, Vs = K[s, h], V[s, h]
        kl, vl = Ks[L - 1], Vs[L - 1]
        for d in range(D):
            store(kl, d, k[r, h, d])
            store(vl, d, v[r, h, d])
        qv = q[r, h]
        Kf, Vf = Ks.reshape(-1), Vs.reshape(-1)   # to prefetch 8 positions ahead, as matvec does
        nt = min(task + 1, n * H - 1)              # (the next task is the same thread's, but at
        Ln = ends[nt // H]                         # the end of its range of tasks)
        Kn, Vn = K[slots[nt // H], nt % H].reshape(-1), V[slots[nt // H], nt % H].reshape(-1)
        p = np.empty(L, np.float32)
        L4 = L // 4 * 4
        for t in range(0, L4, 4):
            for d in range(0, 4 * D, step):
                _prefetch(Kf, (t + 8) * D + d)
                if t < Ln:
                    _prefetch(Kn, t * D + d)
            k0, k1, k2, k3 = Ks[t], Ks[t + 1], Ks[t + 2], Ks[t + 3]
            a0 = a1 = a2 = a3 = np.float32(0)
            for d in range(D):
                a0 += qv[d] * widen(k0[d])
                a1 += qv[d] * widen(k1[d])
                a2 += qv[d] * widen(k2[d])
                a3 += qv[d] * widen(k3[d])
            p[t], p[t + 1], p[t + 2], p[t + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        for t in range(L4, L):
            kt = Ks[t]
            acc = np.float32(0)
            for d in range(D):
                acc += qv[d] * widen(kt[d])
            p[t] = acc * scale
        top = np.float32(-np.inf)
        for t in range(L):
            top = max(top, p[t])
        total = np.float32(0)
        for t in range(L):
            e = _exp(p[t] - top)
            p[t] = e
            total += e
        o = out[r, h]
        o[:] = 0
        for t in range(0, L - 1, 2):
            for d in range(0, 2 * D, step):
                _prefetch(Vf, (t + 8) * D + d)
                if t < Ln:
                    _prefetch(Vn, t * D + d)
            p0, p1, v0, v1 = p[t], p[t + 1], Vs[t], Vs[t + 1]
            for d in range(D):
                o[d] += p0 * widen(v0[d]) + p1 * widen(v1[d])
        if L % 2:
            pt, vt = p[L - 1], Vs[L - 1]
            for d in range(D):
                o[d] += pt * widen(vt[d])
        inv = np.float32(1) / total
        for d in range(D):
            o[d] *= inv


@njit(parallel=True, boundscheck=False, cache=True, nogil=True)
def round_bf16(x, out):
    """out [M, K] uint16 = x [M, K] float32 as bf16 bits, rounded to nearest even as
    weights.f32_to_bf16 and torch round (NaN stays NaN): prefill's activations for a bf16 GEMM."""
    M, K = x.shape
    for i in prange(M):
        row, o = x[i], out[i]
        for j in range(K):
            u = _f32_bits(row[j])
            r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            o[j] = np.uint16(0x7FC0) if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else np.uint16(r)


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True)
def store_kv(dst, t0, src):
    """dst[h, t0 + t, :] = src[t, h, :]: a prompt chunk's keys or values into one slot of the
    cache, dst [H, capacity, D] float32 or int16 (f16 bits: see `store`), src [T, H, D] float32,
    both C-contiguous (so that the rows vectorize); one thread."""
    T, H, D = src.shape
    for h in range(H):
        for t in range(T):
            row, x = dst[h, t0 + t], src[t, h]
            for d in range(D):
                store(row, d, x[d])


@njit(boundscheck=False, cache=True, nogil=True)
def load_kv(src, S, out):
    """out[h, t, :] = src[h, t, :] as float32 for t < S: src [H, capacity, D] one slot of the
    cache (float32 or int16 f16 bits), C-contiguous; out [H, S, D]; one thread."""
    H = src.shape[0]
    D = src.shape[2]
    for h in range(H):
        for t in range(S):
            row, o = src[h, t], out[h, t]
            for d in range(D):
                o[d] = widen(row[d])


@njit(fastmath={"reassoc", "nsz", "contract"}, boundscheck=False, cache=True, nogil=True)
def layer_norm(x, w, b, eps, out):
    """out[R, C] = (x - mean) / sqrt(var + eps) * w + b, row by row, in float32; one thread.
    NumPy took ~11 us a call on one row of 768 (seven small ufunc calls; this, 1.4), 25
    calls per GPT-2-small token. Each row's numbers are the same whatever the other rows (fixed
    summation order per length), so decode and prefill rows may share a call."""
    R, C = x.shape
    n = np.float32(C)
    for r in range(R):
        row, o = x[r], out[r]
        s = np.float32(0)
        for j in range(C):
            s += row[j]
        mu = s / n
        v = np.float32(0)
        for j in range(C):
            d = row[j] - mu
            v += d * d
        inv = np.float32(1) / np.sqrt(v / n + eps)
        for j in range(C):
            o[j] = (row[j] - mu) * inv * w[j] + b[j]


# tanh as Eigen's 13/6-degree rational function (a couple of ulp of tanh on [-9, 9], +-1 beyond)
_TANH_P = tuple(F32(c) for c in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                                 5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                                 4.89352455891786e-03))
_TANH_Q = tuple(F32(c) for c in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                                 4.89352518554385e-03))


@njit(fastmath={"contract"}, boundscheck=False, cache=True, nogil=True, error_model="numpy")
def gelu_tanh(x):
    """x = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in place, x 1-D contiguous; one thread.

    NumPy's nine ufunc passes took 5.9 us on a row of 3072 (GPT-2-small's MLP, 12 a token);
    this, 1.2 (GPT-2-small q8 decode 3.67 -> 3.63 and 3.40 -> 3.34 ms a token). It vectorizes
    because tanh is arithmetic here (no libm call) and error_model="numpy" drops numba's
    division-by-zero check, whose branch kept the loop scalar. Against torch's gelu(approximate=
    "tanh") it is within 1e-6 absolute (NumPy's np.tanh formula: 5e-7)."""
    p13, p11, p9, p7, p5, p3, p1 = _TANH_P
    q6, q4, q2, q0 = _TANH_Q
    for i in range(x.shape[0]):
        v = x[i]
        t = F32(0.7978845608028654) * (v + F32(0.044715) * v * v * v)
        t = t if t < F32(9) else F32(9)
        t = t if t > F32(-9) else F32(-9)
        t2 = t * t
        p = t * (((((((p13 * t2 + p11) * t2 + p9) * t2 + p7) * t2 + p5) * t2 + p3) * t2) + p1)
        q = ((q6 * t2 + q4) * t2 + q2) * t2 + q0
        x[i] = F32(0.5) * v * (F32(1) + p / q)


def _cpu_features() -> set[str]:
    """The CPU features numba compiles for (NUMBA_CPU_FEATURES when compiling for another CPU)."""
    import numba
    from llvmlite import binding

    if numba.config.CPU_FEATURES is not None:
        return {f[1:] for f in numba.config.CPU_FEATURES.split(",") if f.startswith("+")}
    return {k for k, on in binding.get_host_cpu_features().items() if on}


def _vector_lanes() -> int:
    """float32 lanes of the widest vector registers numba compiles for: 16 (AVX-512), 8 (AVX), 4."""
    features = _cpu_features()
    return 16 if "avx512f" in features else 8 if "avx" in features else 4


LANES = _vector_lanes()
# gemm over q8 weights multiplies int16 pairs (pmaddwd) where the vector registers have it:
# AVX-512BW at 16 lanes, AVX2 at 8; with VNNI the multiply and the add are one instruction
_FEATURES = _cpu_features()
PAIRS = {16: "avx512bw", 8: "avx2"}.get(LANES) in _FEATURES
VNNI = LANES == 16 and "avx512vnni" in _FEATURES
NR = 2 * LANES          # gemm: columns of one micro-panel: two vector registers
MR = 8 if LANES == 16 else 6  # gemm: rows of x per tile; MR x 2 accumulators fill half or more of the registers
KC = 128                # gemm: rows of w per panel: a micro-panel (KC x NR f32) stays in L1
NC = 512                # gemm: columns of w per panel at most: a panel (KC x NC f32, 256 KB) stays in L2
PD = 8                  # gemm: rows of w ahead that the packing prefetches


def _widen_vector(builder, v, dtype, n):
    """LLVM IR: n stored weights (a vector of their storage type) -> <n x float>."""
    from llvmlite import ir

    f32v = ir.VectorType(ir.FloatType(), n)
    if dtype == types.float32:
        return v
    if dtype == types.int8:
        return builder.sitofp(v, f32v)
    if dtype == types.uint16:   # bf16: the top half of an f32
        i32v = ir.VectorType(ir.IntType(32), n)
        return builder.bitcast(builder.shl(builder.zext(v, i32v), ir.Constant(i32v, [16] * n)), f32v)
    return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), n)), f32v)   # f16 (F16C)


@intrinsic
def _eight_rows_vec(typingctx, w, k, j, x, a, i):
    """a[i:i+LANES] += x[0, k] * widen(w[k, j:j+LANES]) + ... + x[0, k+7] * widen(w[k+7, j:j+LANES]),
    one fused multiply-add after another from a's value (the order LLVM gives the loop in
    _matvec_rows, so the same bits). Straight-line vector code: the loop vectorizer, which
    checks before every line that a and w do not overlap, never sees it."""
    sig = types.void(w, k, j, x, a, i)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        from numba.core import cgutils

        wty, _, _, xty, aty, _ = signature.args
        W, X, A = (context.make_array(t)(context, builder, v) for t, v in ((wty, args[0]), (xty, args[3]), (aty, args[4])))
        vec = ir.VectorType(ir.FloatType(), LANES)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{LANES}f32")
        i64 = ir.IntType(64)
        stored = ir.VectorType(context.get_data_type(wty.dtype), LANES)
        pa = builder.bitcast(cgutils.get_item_pointer(context, builder, aty, A, [args[5]], wraparound=False),
                             vec.as_pointer())
        s = builder.load(pa, align=4)
        for r in range(8):
            kr = builder.add(args[1], ir.Constant(i64, r))
            pw = cgutils.get_item_pointer(context, builder, wty, W, [kr, args[2]], wraparound=False)
            wv = _widen_vector(builder, builder.load(builder.bitcast(pw, stored.as_pointer()), align=1), wty.dtype, LANES)
            px = cgutils.get_item_pointer(context, builder, xty, X, [ir.Constant(i64, 0), kr], wraparound=False)
            s = builder.call(fma, [_splat(builder, builder.load(px, align=4)), wv, s])
        builder.store(s, pa, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _widen_nr(typingctx, src, i, dst, j):
    """dst[j:j+NR] = widen(src[i:i+NR]): one row of a micro-panel, as vectors (dst[j] aligned)."""
    sig = types.void(src, i, dst, j)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        from numba.core import cgutils

        sty, _, dty, _ = signature.args
        S = context.make_array(sty)(context, builder, args[0])
        D = context.make_array(dty)(context, builder, args[2])
        elem = context.get_data_type(sty.dtype)
        ps = cgutils.get_item_pointer(context, builder, sty, S, [args[1]], wraparound=False)
        v = builder.load(builder.bitcast(ps, ir.VectorType(elem, NR).as_pointer()), align=1)
        v = _widen_vector(builder, v, sty.dtype, NR)
        pd = cgutils.get_item_pointer(context, builder, dty, D, [args[3]], wraparound=False)
        builder.store(v, builder.bitcast(pd, v.type.as_pointer()), align=min(64, 4 * NR))
        return context.get_dummy_value()

    return sig, codegen


def _pack_row(src, i, dst, j):
    """dst[j:j+NR] = widen(src[i:i+NR])."""


@overload(_pack_row, inline="always")
def _pack_row_impl(src, i, dst, j):
    if src.dtype == types.int16 and not _F16C:   # no vector half type without F16C: one by one
        def scalar(src, i, dst, j):
            for n in range(NR):
                dst[j + n] = widen(src[i + n])
        return scalar
    return lambda src, i, dst, j: _widen_nr(src, i, dst, j)


@intrinsic
def _tile(typingctx, xp, xo, wp, wo, kc, c, co, ldc, first):
    """The micro-kernel: c[co + r*ldc + j] = (0 if first else c[...]) + sum over k < kc of
    xp[xo + k*MR + r] * wp[wo + k*NR + j], for r < MR, j < NR (kc >= 1, wp[wo] vector-aligned).

    Written in LLVM IR so that the MR x 2 sums live in vector registers for the whole loop
    (SSA values through phi nodes; numba's arrays would go through memory): per k, two vector
    loads of w, MR broadcasts of x and 2 MR fused multiply-adds."""
    sig = types.void(xp, xo, wp, wo, kc, c, co, ldc, first)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        from numba.core import cgutils

        i64 = ir.IntType(64)
        vec = ir.VectorType(ir.FloatType(), LANES)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{LANES}f32")

        def at(n, off):   # &array n [off]
            return builder.gep(context.make_array(signature.args[n])(context, builder, args[n]).data, [off])

        X, W, C = at(0, args[1]), at(2, args[3]), at(5, args[6])
        kc, ldc, const = args[4], args[7], (lambda n: ir.Constant(i64, n))
        first = builder.icmp_unsigned("!=", args[8], ir.Constant(args[8].type, 0))
        out = [[builder.bitcast(builder.gep(C, [builder.add(builder.mul(const(r), ldc), const(h * LANES))]), vec.as_pointer())
                for h in range(2)] for r in range(MR)]
        zero = ir.Constant(vec, [0.0] * LANES)
        init = [[builder.select(first, zero, builder.load(p, align=4)) for p in row] for row in out]
        entry, loop, done = builder.block, builder.append_basic_block("tile.k"), builder.append_basic_block("tile.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        k = builder.phi(i64)
        acc = [[builder.phi(vec) for _ in range(2)] for _ in range(MR)]
        wk = builder.gep(W, [builder.mul(k, const(NR))])
        w0 = builder.load(builder.bitcast(wk, vec.as_pointer()), align=4 * LANES)
        w1 = builder.load(builder.bitcast(builder.gep(wk, [const(LANES)]), vec.as_pointer()), align=4 * LANES)
        xk = builder.gep(X, [builder.mul(k, const(MR))])
        new = []
        for r in range(MR):
            b = _splat(builder, builder.load(builder.gep(xk, [const(r)]), align=4))
            new.append([builder.call(fma, [b, w0, acc[r][0]]), builder.call(fma, [b, w1, acc[r][1]])])
        k1 = builder.add(k, const(1))
        k.add_incoming(const(0), entry)
        k.add_incoming(k1, loop)
        for r in range(MR):
            for h in range(2):
                acc[r][h].add_incoming(init[r][h], entry)
                acc[r][h].add_incoming(new[r][h], loop)
        builder.cbranch(builder.icmp_signed("<", k1, kc), loop, done)
        builder.position_at_end(done)
        for r in range(MR):
            for h in range(2):
                builder.store(new[r][h], out[r][h], align=4)
        return context.get_dummy_value()

    return sig, codegen


def gemm(x, w, out, scale=NONE, bias=NONE):
    """out[M, N] = x[M, K] @ w[K, N] (* scale[N]) (+ bias[N]) for prefill, w in its stored bits
    (bf16, f16, q8, or f32), widened as it is packed, never into a matrix in memory.

    BLIS's plan: each thread owns panels of KC rows x up to NC columns of w; it widens one into
    f32 micro-panels of NR columns (256 KB, in its L2), then runs the MR x NR micro-kernel
    (_tile) over every MR rows of x (packed once, MR values per k) with one micro-panel in L1.
    Rows of w are prefetched PD rows ahead as they are packed (each panel row is on another
    page). Against widening w into memory for OpenBLAS's sgemm (what prefill did before), 2
    threads, 128 rows, medians of 6, in one process: GPT-J width's [4096, 28672] 100.8 ->
    80.7 ms at bf16, 102.3 -> 78.8 at q8 (sgemm on the f32 matrix: 96-99); [20480, 4096] 69.7
    -> 59.8 and 57.9 (sgemm 71); GPT-2-small's [3072, 768] 4.6 -> 1.6 (sgemm 1.9).
    Each output's sum runs over k in order, in KC-row blocks; no result depends on M or on
    the thread count.

    q8 weights, where the CPU multiplies int16 pairs (AVX-512BW, AVX2): _gemm_pairs rounds x to
    int16 per row and KC-block of k (a power-of-two scale each, so that only the rounding loses:
    at most 2^-15 of the block's largest |x|) and sums integer products of pairs of k, two per
    32-bit lane and instruction (vpdpwssd), where the f32 micro-kernel does one FMA per weight.
    2 threads, 128 rows: GPT-2-small's [768, 3072] 1.40 -> 0.78 ms, GPT-J width's [4096,
    16384] 43-58 -> 26-31 ms (1.5-1.9x over the shapes); GPT-2-small q8 prefill of 128 tokens
    84 -> 65 ms, GPT-J width (4 layers) 574 -> 332; logits within 1.2-1.4e-4 of the largest
    (q8's weights alone: 1-3e-2), greedy tokens the same. Decode's GEMV rounds x the same way
    where it can (_matvec_pairs).
    """
    _gemm_call(np.ascontiguousarray(x), w, out, scale, bias, threads.kernel_threads())


@njit(cache=True, nogil=True)
def _gemm_call(x, w, out, scale, bias, T):   # gemm's kernel (_gemm_for), on writable types (_writable)
    _gemm_split(_writable(x), _writable(w), out, _writable(scale), _writable(bias), T)


def _gemm_split(x, w, out, scale, bias, T):
    """_gemm_for(w)(x, w, out, scale, bias, T), chosen as it compiles."""


@overload(_gemm_split, inline="always")
def _gemm_split_impl(x, w, out, scale, bias, T):
    kernel = _gemm_for(w)
    return lambda x, w, out, scale, bias, T: kernel(x, w, out, scale, bias, T)


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True)
def _gemm_trivial(M, K, N, out, scale, bias):
    """A GEMM with nothing to sum: no rows or no columns (nothing to do), or K = 0 (the
    epilogue of 0). -> whether it was one."""
    if M == 0 or N == 0:
        return True
    if K == 0:
        for m in range(M):
            for j in range(N):
                out[m, j] = _epilogue(np.float32(0), scale, bias, j)
        return True
    return False


@njit(cache=True, nogil=True)
def _panels(N, T):
    """gemm's panels of w's N columns: (width, count, micro-panels per panel); a multiple of T
    panels of equal width (a multiple of NR), each at most NC wide."""
    npan = T * ((N + T * NC - 1) // (T * NC))
    nc = ((N + npan - 1) // npan + NR - 1) // NR * NR
    return nc, (N + nc - 1) // nc, nc // NR


def _micro(xp, xs, ib, kb, K, kk, wb, wo, c, co, ldc, first):
    """The micro-kernel for x's packing: c[co + r*ldc + j] = (0 if first else c[...]) + the sums
    over k-block kb (kk rows) of x's rows ib*MR.. times micro-panel wb[wo:]: _tile for f32 x
    (_gemm), _tile_pairs for int16 pairs and their scales xs (_gemm_pairs)."""


@overload(_micro, inline="always")
def _micro_impl(xp, xs, ib, kb, K, kk, wb, wo, c, co, ldc, first):
    if xp.dtype == types.float32:
        def f32(xp, xs, ib, kb, K, kk, wb, wo, c, co, ldc, first):
            _tile(xp, (ib * K + kb * KC) * MR, wb, wo, kk, c, co, ldc, first)
        return f32

    def pairs(xp, xs, ib, kb, K, kk, wb, wo, c, co, ldc, first):
        nkb = (K + KC - 1) // KC
        KP = nkb * (KC // 2)
        _tile_pairs(xp, ib * MR * KP + kb * (KC // 2), KP, wb, wo, (kk + 1) // 2, c, co, ldc, first, xs,
                    (ib * nkb + kb) * MR)
    return pairs


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True)
def _tiles(xp, xs, out, ct, wb, ps, nmp, j0, jn, kb, kk, K, scale, bias):
    """Every MR x NR tile of out's columns j0:jn over k-block kb (kk rows of w, packed in wb's
    nmp micro-panels of ps), for gemm's two packings of x (_micro), summed in the thread's own
    buffer ct (rows of nmp * NR + LANES floats); after w's last block, the sums go to out, each
    with its epilogue.

    Not in out itself, whose rows are N floats apart (GPT-J's 16,384: 64 KB): there a tile's
    eight rows, and every tile's, fall in the same few cache sets, and each block of k read
    them back from L3. Against summing in out, the same bits, in one process, 2 threads: the
    GEMM alone at 128 rows, GPT-2-small's shapes f16 1.04-1.13x, q8 1.06-1.36x, GPT-J width's
    [4096, 16384] f16 1.06-1.11x; a 128-token prefill, GPT-2 small f16 1.10x, q8 1.52x, bf16
    (OpenBLAS) 1.06x, GPT-2 medium f16 1.10x, q8 1.07x, GPT-J width (4 layers) f16 0.95-1.06x,
    q8 1.21x. Every tile is a whole one: the buffer's rows and columns are padded (x's padded
    rows are zeros)."""
    M = out.shape[0]
    ld = nmp * NR + LANES
    for mp in range(nmp):
        if j0 + mp * NR >= jn:
            break
        for ib in range((M + MR - 1) // MR):
            _micro(xp, xs, ib, kb, K, kk, wb, mp * ps, ct, ib * MR * ld + mp * NR, ld, kb == 0)
    if kb * KC + kk == K:
        for m in range(M):
            o = out[m]
            for j in range(j0, jn):
                o[j] = _epilogue(ct[m * ld + j - j0], scale, bias, j)


@njit(parallel=True, fastmath=True, boundscheck=False, cache=True, nogil=True)
def _gemm(x, w, out, scale, bias, T):
    M, K = x.shape
    N = w.shape[1]
    if _gemm_trivial(M, K, N, out, scale, bias):
        return
    nib = (M + MR - 1) // MR
    xp = np.empty(nib * K * MR, np.float32)   # x packed: per MR rows, MR values per k
    for t in prange(T):
        for ib in range(t, nib, T):
            for k in range(K):
                for r in range(MR):
                    m = ib * MR + r
                    xp[(ib * K + k) * MR + r] = x[m, k] if m < M else np.float32(0)
    nc, npan, nmp = _panels(N, T)
    ps = KC * NR + 16       # a micro-panel's floats, one line more (each starts on a new L1 set)
    buffers = np.empty((T, ps * nmp + 16), np.float32)
    tiles = np.empty((T, nib * MR * (nmp * NR + LANES) + 16), np.float32)   # sums (_tiles)
    for t in prange(T):
        raw = buffers[t]
        start = (64 - raw.ctypes.data % 64) % 64 // 4
        wb = raw[start:start + ps * nmp]
        ct = tiles[t, (64 - tiles[t].ctypes.data % 64) % 64 // 4:]
        for p in range(t, npan, T):
            j0 = p * nc
            jn = min(N, j0 + nc)
            for k0 in range(0, K, KC):
                kk = min(K, k0 + KC) - k0
                for k in range(k0, k0 + kk):
                    row = w[k]
                    if k + PD < K:
                        ahead = w[k + PD]
                        for j in range(j0, jn, 64 // ahead.itemsize):
                            _prefetch(ahead, j)
                    for mp in range(nmp):
                        c0, b = j0 + mp * NR, mp * ps + (k - k0) * NR
                        if c0 + NR <= jn:
                            _pack_row(row, c0, wb, b)
                        else:
                            for j in range(NR):
                                wb[b + j] = widen(row[c0 + j]) if c0 + j < jn else np.float32(0)
                _tiles(xp, NONE, out, ct, wb, ps, nmp, j0, jn, k0 // KC, kk, K, scale, bias)


@intrinsic
def _tile_pairs(typingctx, xq, xo, rs, wp, wo, npairs, c, co, ldc, first, xs, so):
    """The q8 micro-kernel: c[co + r*ldc + j] = (0 if first else c[...]) + xs[so + r] * sum over
    p < npairs of the int16 pair products xq[xo + r*rs + p] . wp[wo + p*NR + j], for r < MR,
    j < NR; each int32 of xq and wp holds two int16s (x's at k and k+1; w's at k and k+1 of
    column j). Integer sums (exact: |x| <= 32767 and |w| <= 127 over KC rows stay far inside
    int32), MR x 2 vectors of them in registers as in _tile; one pmaddwd and one add (one
    vpdpwssd with VNNI) per 2 x LANES weights, where _tile spends one FMA per LANES."""
    sig = types.void(xq, xo, rs, wp, wo, npairs, c, co, ldc, first, xs, so)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        from numba.core import cgutils

        i64, i32 = ir.IntType(64), ir.IntType(32)
        ivec, fvec = ir.VectorType(i32, LANES), ir.VectorType(ir.FloatType(), LANES)
        mac = _pair_mac(builder)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fvec, [fvec] * 3), f"llvm.fmuladd.v{LANES}f32")

        def at(n, off):   # &array n [off]
            return builder.gep(context.make_array(signature.args[n])(context, builder, args[n]).data, [off])

        X, W, C, S = at(0, args[1]), at(3, args[4]), at(6, args[7]), at(10, args[11])
        npairs, ldc, const = args[5], args[8], (lambda n: ir.Constant(i64, n))
        first = builder.icmp_unsigned("!=", args[9], ir.Constant(args[9].type, 0))
        xr = [builder.gep(X, [builder.mul(const(r), args[2])]) for r in range(MR)]   # row r's pairs
        zero = ir.Constant(ivec, [0] * LANES)
        entry, loop, done = builder.block, builder.append_basic_block("pairs.p"), builder.append_basic_block("pairs.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        p = builder.phi(i64)
        acc = [[builder.phi(ivec) for _ in range(2)] for _ in range(MR)]
        wk = builder.gep(W, [builder.mul(p, const(NR))])
        w = [builder.load(builder.bitcast(builder.gep(wk, [const(h * LANES)]), ivec.as_pointer()), align=4 * LANES)
             for h in range(2)]
        new = []
        for r in range(MR):
            b = _splat(builder, builder.load(builder.gep(xr[r], [p]), align=4))
            new.append([mac(acc[r][h], w[h], b) for h in range(2)])
        p1 = builder.add(p, const(1))
        p.add_incoming(const(0), entry)
        p.add_incoming(p1, loop)
        for r in range(MR):
            for h in range(2):
                acc[r][h].add_incoming(zero, entry)
                acc[r][h].add_incoming(new[r][h], loop)
        builder.cbranch(builder.icmp_signed("<", p1, npairs), loop, done)
        builder.position_at_end(done)
        for r in range(MR):
            sr = _splat(builder, builder.load(builder.gep(S, [const(r)]), align=4))
            for h in range(2):
                ptr = builder.bitcast(builder.gep(C, [builder.add(builder.mul(const(r), ldc), const(h * LANES))]),
                                      fvec.as_pointer())
                old = builder.select(first, ir.Constant(fvec, [0.0] * LANES), builder.load(ptr, align=4))
                builder.store(builder.call(fma, [builder.sitofp(new[r][h], fvec), sr, old]), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _pack_pairs(typingctx, lo, hi, c, dst, j):
    """dst[j:j+NR] = the int16 pairs (lo[c+i], hi[c+i]) for i < NR: two rows of int8 weights as
    one row of a _tile_pairs micro-panel, in vectors (dst[j] aligned)."""
    sig = types.void(lo, hi, c, dst, j)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        from numba.core import cgutils

        lty, hty, _, dty, _ = signature.args
        i8v, i16v = ir.VectorType(ir.IntType(8), NR), ir.VectorType(ir.IntType(16), NR)
        rows = []
        for ty, ary in ((lty, args[0]), (hty, args[1])):
            ptr = cgutils.get_item_pointer(context, builder, ty, context.make_array(ty)(context, builder, ary), [args[2]],
                                           wraparound=False)
            rows.append(builder.sext(builder.load(builder.bitcast(ptr, i8v.as_pointer()), align=1), i16v))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), 2 * NR), [i // 2 + (i % 2) * NR for i in range(2 * NR)])
        pairs = builder.shuffle_vector(rows[0], rows[1], mask)
        D = context.make_array(dty)(context, builder, args[3])
        pd = cgutils.get_item_pointer(context, builder, dty, D, [args[4]], wraparound=False)
        builder.store(pairs, builder.bitcast(pd, pairs.type.as_pointer()), align=min(64, 4 * NR))
        return context.get_dummy_value()

    return sig, codegen


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True, inline="always")
def _pair(lo, hi):   # two int16s in one int32: lo in the low half
    return (np.int32(lo) & np.int32(0xFFFF)) | (np.int32(hi) << np.int32(16))


@intrinsic
def _pack_pair_row(typingctx, row, c, dst, j):
    """dst[j:j+NR] = the NR int16 pairs of a row of q8 weights stored as pairs (weights.pairs;
    row [N, 2], C-contiguous) from column c on: its bytes widened to int16 (dst[j] aligned)."""
    sig = types.void(row, c, dst, j)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        from numba.core import cgutils

        rty, _, dty, _ = signature.args
        i64 = ir.IntType(64)
        c = builder.sext(args[1], i64) if args[1].type.width < 64 else args[1]
        ptr = builder.gep(context.make_array(rty)(context, builder, args[0]).data, [builder.mul(c, ir.Constant(i64, 2))])
        v = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(8), 2 * NR).as_pointer()), align=1)
        pairs = builder.sext(v, ir.VectorType(ir.IntType(16), 2 * NR))
        D = context.make_array(dty)(context, builder, args[2])
        pd = cgutils.get_item_pointer(context, builder, dty, D, [args[3]], wraparound=False)
        builder.store(pairs, builder.bitcast(pd, pairs.type.as_pointer()), align=min(64, 4 * NR))
        return context.get_dummy_value()

    return sig, codegen


# _gemm_pairs' reading of w, for w [K, N] and for w stored as pairs ([4, K/8, N, 2], weights.pairs)

def _pair_rows(w, k, end, zeros):
    """Rows k and k+1 of w as (lo, hi) (hi = zeros at an odd last row, k + 1 = end); for w stored
    as pairs, pair row k/2 ([N, 2]: stripe k/2 % 4, its row k/8), twice."""


@overload(_pair_rows, inline="always")
def _pair_rows_impl(w, k, end, zeros):
    if w.ndim == 4:
        return lambda w, k, end, zeros: (w[k // 2 % 4, k // 8], w[k // 2 % 4, k // 8])
    return lambda w, k, end, zeros: (w[k], w[k + 1] if k + 1 < end else zeros)


def _prefetch_pair_rows(w, k, j0, jn):
    """Prefetch columns j0:jn of rows k and k+1 (of w, or of w stored as pairs)."""


@overload(_prefetch_pair_rows, inline="always")
def _prefetch_pair_rows_impl(w, k, j0, jn):
    if w.ndim == 4:
        def pairs(w, k, j0, jn):
            row = w[k // 2 % 4, k // 8, :, 0]   # (element j: the line of column j's pair)
            for j in range(j0, jn, 32):
                _prefetch(row, j)
        return pairs

    def rows(w, k, j0, jn):
        ahead, ahead2 = w[k], w[min(w.shape[0] - 1, k + 1)]
        for j in range(j0, jn, 64):
            _prefetch(ahead, j)
            _prefetch(ahead2, j)
    return rows


def _pack_pair_rows(w, lo, hi, c, dst, j):
    """dst[j:j+NR] = columns c:c+NR of _pair_rows' (lo, hi) as int16 pairs."""


@overload(_pack_pair_rows, inline="always")
def _pack_pair_rows_impl(w, lo, hi, c, dst, j):
    if w.ndim == 4:
        return lambda w, lo, hi, c, dst, j: _pack_pair_row(lo, c, dst, j)
    return lambda w, lo, hi, c, dst, j: _pack_pairs(lo, hi, c, dst, j)


def _pair_at(w, lo, hi, c):
    """Column c of _pair_rows' (lo, hi) as one int16 pair."""


@overload(_pair_at, inline="always")
def _pair_at_impl(w, lo, hi, c):
    if w.ndim == 4:
        return lambda w, lo, hi, c: _pair(lo[c, 0], lo[c, 1])
    return lambda w, lo, hi, c: _pair(lo[c], hi[c])


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True)
def _quantize_row(x, q, xs, stride):
    """One row of x as int16 for _tile_pairs, in blocks of KC: q[kb*KC + i] = x[kb*KC + i] / xs[kb *
    stride], rounded to nearest even, where xs[kb * stride] is the power of two that puts the
    block's largest |x| in 16384..32767 (the scaling is exact; only the rounding loses, at most
    2^-15 of the block's largest value). A short last block is quantized as if zero-padded to KC.
    A block holding a NaN or an infinity gets a NaN scale, which its sums carry. (Its largest |x|
    is taken on the bits: a non-negative float orders as its bits do, and a NaN or an infinity
    above every finite one.) The loops run over exactly KC values: over a block's own length
    LLVM left them scalar, 10x slower."""
    K = x.shape[0]
    pad = np.zeros(KC, np.float32)
    qpad = np.empty(KC, np.int16)
    for kb in range((K + KC - 1) // KC):
        k0, n = kb * KC, min(KC, K - kb * KC)
        xb, qb = x[k0:k0 + KC], q[k0:k0 + KC]
        if n < KC:
            pad[:n] = x[k0:]
            xb, qb = pad, qpad
        bits = xb.view(np.uint32)
        top = np.uint32(0)
        for i in range(KC):
            top = max(top, bits[i] & np.uint32(0x7FFFFFFF))
        if top >= np.uint32(0x7F800000):
            s, inv = np.float32(np.nan), np.float32(0)
        else:
            amax, s = _bits_to_f32(top), np.float32(1)
            if amax > 0:
                s = np.float32(math.ldexp(1.0, math.frexp(amax)[1] - 15))   # amax / s in [16384, 32768)
                if np.rint(amax / s) > 32767:
                    s *= np.float32(2)
            inv = np.float32(1) / s   # a power of two: x * inv is x / s exactly
        xs[kb * stride] = s
        for i in range(KC):
            qb[i] = np.int16(np.rint(xb[i] * inv))
        if n < KC:
            q[k0:k0 + n + n % 2] = qpad[:n + n % 2]   # (an odd block's pair ends with a 0)


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True)
def _quantize_rows(x):
    """Every row of x [M, K] as the decode GEMV on int16 pairs takes it (_pairs_of_rows) -> (xq:
    row m's int16s from xq[m * kp] on, two an int32; xs: row m's scale for block b at
    xs[m * nkb + b]; kp; nkb), each row quantized by _quantize_row."""
    M, K = x.shape
    nkb = (K + KC - 1) // KC
    q16 = np.empty(M * nkb * KC, np.int16)
    xs = np.empty(M * nkb, np.float32)
    for m in range(M):
        _quantize_row(x[m], q16[m * nkb * KC:], xs[m * nkb:], 1)
    return q16.view(np.int32), xs, nkb * KC // 2, nkb


@njit(parallel=True, fastmath=True, boundscheck=False, cache=True, nogil=True)
def _gemm_pairs(x, w, out, scale, bias, T):
    """_gemm for q8 weights (int8), with x rounded to int16 per row and KC-block of k (see
    _quantize_row) and integer products (_tile_pairs): two weights per lane and instruction
    where _gemm widens them to f32 and runs one FMA per weight per lane. The same blocking,
    packing and prefetching as _gemm; micro-panels hold int16 pairs of rows k, k+1."""
    M, K = x.shape
    N = out.shape[1]
    if _gemm_trivial(M, K, N, out, scale, bias):
        return
    nib = (M + MR - 1) // MR
    nkb = (K + KC - 1) // KC
    KP = nkb * (KC // 2)   # int16 pairs per row of x, each k-block padded to KC // 2
    q16 = np.empty((nib * MR, 2 * KP), np.int16)
    xs = np.empty(nib * nkb * MR, np.float32)   # (ib, kb, r): a scale per MR rows' k-block
    for t in prange(T):
        for ib in range(t, nib, T):
            for r in range(MR):
                m = ib * MR + r
                if m < M:
                    _quantize_row(x[m], q16[m], xs[ib * nkb * MR + r:], MR)
                else:
                    q16[m, :] = 0
                    xs[ib * nkb * MR + r::MR][:nkb] = 1
    xq = q16.reshape(-1).view(np.int32)
    nc, npan, nmp = _panels(N, T)
    ps = KC // 2 * NR + 16    # a micro-panel's int32s, one line more (each starts on a new L1 set)
    buffers = np.empty((T, ps * nmp + 16), np.int32)
    tiles = np.empty((T, nib * MR * (nmp * NR + LANES) + 16), np.float32)   # sums (_tiles)
    zeros = np.zeros(N, np.int8)
    for t in prange(T):
        raw = buffers[t]
        start = (64 - raw.ctypes.data % 64) % 64 // 4
        wb = raw[start:start + ps * nmp]
        ct = tiles[t, (64 - tiles[t].ctypes.data % 64) % 64 // 4:]
        for p in range(t, npan, T):
            j0 = p * nc
            jn = min(N, j0 + nc)
            for kb in range(nkb):
                k0 = kb * KC
                kk = min(K, k0 + KC) - k0
                npairs = (kk + 1) // 2
                for q in range(npairs):
                    k = k0 + 2 * q
                    lo, hi = _pair_rows(w, k, k0 + kk, zeros)
                    if k + PD < K:
                        _prefetch_pair_rows(w, k + PD, j0, jn)
                    for mp in range(nmp):
                        c0, b = j0 + mp * NR, mp * ps + q * NR
                        if c0 + NR <= jn:
                            _pack_pair_rows(w, lo, hi, c0, wb, b)
                        else:
                            for j in range(NR):
                                wb[b + j] = _pair_at(w, lo, hi, c0 + j) if c0 + j < jn else 0
                _tiles(xq, xs, out, ct, wb, ps, nmp, j0, jn, kb, kk, K, scale, bias)


def _gemm_for(w):
    """The prefill GEMM for these weights (an array, or numba's type of one): int16 pairs for q8
    where the CPU multiplies them."""
    return _gemm_pairs if PAIRS and str(w.dtype) == "int8" else _gemm


def small_matmul(x, w, bias=None):
    """x [M, K] @ w (+ bias) for f32 weights and M <= 8 (decode) in one pass over w, where
    OpenBLAS's sgemm would first copy all of w into its packed layout at M > 1 (GPT-2-small's
    matrices, 2 threads, M=8: 13.3 ms against 18.3). w is [K, N] C-contiguous; -> None for any
    other layout (use the BLAS)."""
    if not w.flags.c_contiguous:
        return None
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    matvec(x, w, out, NONE, NONE if bias is None else bias)
    return out


@njit(parallel=True, boundscheck=False, cache=True, nogil=True)
def interleave(src, dst, h0):
    """Pair row h0 + h of dst [4, K/8, N, 2] (stripe (h0 + h) % 4, its row (h0 + h) // 4), for
    each column j, = (src[2h, j], src[2h + 1, j]): q8 weights' rows as pairs, for weights.pairs
    (an odd last row paired with 0)."""
    K, N = src.shape
    zeros = np.zeros(N, np.int8)
    for h in prange((K + 1) // 2):
        lo, hi, d = src[2 * h], src[2 * h + 1] if 2 * h + 1 < K else zeros, dst[(h0 + h) % 4, (h0 + h) // 4]
        for j in range(N):
            d[j, 0] = lo[j]
            d[j, 1] = hi[j]


def warm_up() -> None:
    """Run one tiny kernel, which starts the threading layer (and compiles, or loads the cache)."""
    x = np.ones((1, 4), np.float32)
    matvec(x, np.ones((4, 4), np.int8), np.empty((1, 4), np.float32))


# -- the decode step's blocks ---------------------------------------------------------------
#
# Model._decode_step runs a step where every row feeds one token (generate's decode, batched or
# not) through these, every layer in one compiled call (decode_gpt2, decode_gptj, below). They
# call the kernels above on the same arrays as Model.block does with its NumPy glue, in the
# same order of float32 operations (no fast-math here), so the logits and the cache are the
# same bit for bit (tests/test_batch.py). What they save is the Python between the kernels:
# one call a step instead of ~12 a block (each through numba's dispatcher), no fresh arrays,
# no views. That Python costs a step more than its own time, since the weights streaming
# through push the interpreter's code and data out of the caches between two kernels:
# GPT-2-small q8, 2 threads, 4.00-4.24 -> 3.82-4.11 ms a step with a call a block, against
# the same ~12 calls a block made from Python (one process, alternating, 64 MB read between
# steps; four runs). Compiling them takes ~2-3 s per model dtype, once. They live in this
# file because numba's cache of a function is invalidated only by changes to its own file, not
# to the kernels it calls from another.

DECODE_ACTIVATIONS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "relu": 1}   # config name -> code (others: Model.block)


@njit(cache=True, nogil=True, boundscheck=False)
def _activate(u, act):   # in place on each row of u [N, I]: model.ACTIVATIONS' function
    for n in range(u.shape[0]):
        if act == 0:
            gelu_tanh(u[n])
        else:
            for j in range(u.shape[1]):
                u[n, j] = max(u[n, j], np.float32(0))


@njit(cache=True, nogil=True, boundscheck=False)
def _add(y, x):   # y += x, [N, C]
    for n in range(y.shape[0]):
        for j in range(y.shape[1]):
            y[n, j] += x[n, j]


@njit(cache=True, nogil=True, boundscheck=False)
def _split(u, q, k, v):   # q, k, v [N, H, D] = u's first 3 x C columns
    N, H, D = q.shape
    for n in range(N):
        for h in range(H):
            for d in range(D):
                q[n, h, d] = u[n, h * D + d]
                k[n, h, d] = u[n, (H + h) * D + d]
                v[n, h, d] = u[n, (2 * H + h) * D + d]


@njit(cache=True, nogil=True, boundscheck=False)
def _rotate(x, cos, sin, ends):   # model.rotate_ in place on x [N, H, D], row n at position ends[n] - 1
    for n in range(x.shape[0]):
        c, s = cos[ends[n] - 1], sin[ends[n] - 1]
        for h in range(x.shape[1]):
            row = x[n, h]
            for i in range(c.shape[0]):
                x1, x2 = row[2 * i], row[2 * i + 1]
                row[2 * i] = x1 * c[i] - x2 * s[i]
                row[2 * i + 1] = x2 * c[i] + x1 * s[i]


@njit(cache=True, nogil=True, boundscheck=False)
def decode_gpt2_block(x, y, h, u, r, mlp, a, q, k, v, eps, T, act, K, V, slots, ends, scale,
                      ln1_w, ln1_b, w_qkv, s_qkv, b_qkv, w_o, s_o, b_o, ln2_w, ln2_b, w_in, s_in, b_in, w_out, s_out, b_out):
    """y [N, C] = x through one GPT-2 block; the rest are its buffers (h [N, C], u [N, 3C],
    r [N, C], mlp [N, I], a, q, k, v [N, H, D]), its cache K, V [slots, H, capacity, D] and its
    tensors (each matrix as bits, q8 scale or empty, bias)."""
    N, C = x.shape
    layer_norm(x, ln1_w, ln1_b, eps, h)
    _matvec(h, w_qkv, u, T, s_qkv, b_qkv)
    _split(u, q, k, v)
    attend_decode(q, k, v, K, V, slots, ends, scale, a)
    _matvec(a.reshape(N, C), w_o, r, T, s_o, b_o)
    _add(r, x)
    layer_norm(r, ln2_w, ln2_b, eps, h)
    _matvec(h, w_in, mlp, T, s_in, b_in)
    _activate(mlp.reshape(1, mlp.size), act)   # (in one pass, as model.gelu_new does a contiguous array)
    _matvec(mlp, w_out, y, T, s_out, b_out)
    _add(y, r)


@njit(cache=True, nogil=True, boundscheck=False)
def decode_gptj_block(x, y, h, u, cat, a, q, k, v, eps, T, act, K, V, slots, ends, scale, cos, sin,
                      ln_w, ln_b, w_in, s_in, b_in, w_out, s_out, b_out):
    """y [N, C] = x through one GPT-J block (attention and MLP both read h, one GEMM in and one
    out; u [N, 3C + I], cat [N, C + I]); cos, sin [n_ctx, R/2] (R = 0: no rotation)."""
    N, C = x.shape
    layer_norm(x, ln_w, ln_b, eps, h)
    _matvec(h, w_in, u, T, s_in, b_in)
    _split(u, q, k, v)
    _rotate(q, cos, sin, ends)
    _rotate(k, cos, sin, ends)
    attend_decode(q, k, v, K, V, slots, ends, scale, a)
    mlp = u[:, 3 * C:]
    _activate(mlp, act)                          # (row by row, as model.gelu_new does these columns)
    for n in range(N):
        cat[n, :C] = a[n].reshape(C)
        cat[n, C:] = mlp[n]
    _matvec(cat, w_out, y, T, s_out, b_out)
    _add(y, x)


# -- the decode step's layers in one call -----------------------------------------------------
#
# A block's 16 tensors (GPT-J's 8) go to the compiled code as one row of an int64 table, each an
# (address, rows, columns) triple, which `_vector` and `_matrix` make arrays again: one call
# runs every layer. Passing them as arrays instead, a call a block, cost numba's dispatcher
# 10 us a block hot and ~40 us in a decode step, where the weights streaming through have
# pushed the interpreter out of the caches (GPT-2-small q8: ~0.5 ms of a 10.4 ms step); a
# tuple of the layers' tuples took 8 s to compile, and a typed List ~1.2 s to build in each
# process. The table only points: the model keeps the arrays (Model._decode_args).


@intrinsic
def _address_of(typingctx, address, like):
    """An int64 address as a pointer to like's dtype."""
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))
    return ptr(types.int64, like), codegen


@njit(cache=True, nogil=True, inline="always")
def _vector(t, j):   # tensor j of a layer's table row t, a float32 vector
    return carray(_address_of(t[j, 0], NONE), (t[j, 1],))


def _matrix(t, j, like):
    """Tensor j of a layer's table row t, a matrix of like's dtype and number of dimensions
    (4: q8 weights stored as pairs, [4, rows, columns, 2])."""


@overload(_matrix, inline="always")
def _matrix_impl(t, j, like):
    if like.ndim == 4:
        return lambda t, j, like: carray(_address_of(t[j, 0], like), (4, t[j, 1], t[j, 2], 2))
    return lambda t, j, like: carray(_address_of(t[j, 0], like), (t[j, 1], t[j, 2]))


@njit(cache=True, nogil=True, boundscheck=False)
def _decode_head(x, h, eps, T, head, like, logits):
    """The final layer norm and the LM head, as Model.head, where head (layer_table of ln_f's
    weight and bias, the head's matrix, q8 scale or NONE, bias or NONE) has a row: logits [N,
    V'] = ln_f(x) @ w, h [N, C] the buffer."""
    if head.shape[0]:
        t = head[0]
        layer_norm(x, _vector(t, 0), _vector(t, 1), eps, h)
        _matvec(h, _matrix(t, 2, like), logits, T, _vector(t, 3), _vector(t, 4))


@njit(cache=True, nogil=True, boundscheck=False)
def decode_gpt2(x, y, h, u, r, mlp, a, q, k, v, eps, T, act, K, V, slots, ends, scales, table, like, head, logits):
    """Every layer of GPT-2 (decode_gpt2_block), x -> y for one, y -> x for the next: the output
    is in y for an odd number of layers, in x for an even; then the final layer norm and the LM
    head into logits where head has its row (_decode_head). K, V [layers, slots, H, capacity,
    D]; scales [layers]; table [layers, 16, 3] (layer_table); like: an array of the matrices'
    dtype (and number of dimensions: 4 for q8 stored as pairs)."""
    for i in range(table.shape[0]):
        t = table[i]
        decode_gpt2_block(x, y, h, u, r, mlp, a, q, k, v, eps, T, act, K[i], V[i], slots, ends, scales[i],
                          _vector(t, 0), _vector(t, 1), _matrix(t, 2, like), _vector(t, 3), _vector(t, 4),
                          _matrix(t, 5, like), _vector(t, 6), _vector(t, 7), _vector(t, 8), _vector(t, 9),
                          _matrix(t, 10, like), _vector(t, 11), _vector(t, 12),
                          _matrix(t, 13, like), _vector(t, 14), _vector(t, 15))
        x, y = y, x
    _decode_head(x, h, eps, T, head, like, logits)


@njit(cache=True, nogil=True, boundscheck=False)
def decode_gptj(x, y, h, u, cat, a, q, k, v, eps, T, act, K, V, slots, ends, scales, cos, sin, table, like, head,
                logits):
    """Every layer of GPT-J (decode_gptj_block), and the head, as decode_gpt2; table [layers, 8, 3]."""
    for i in range(table.shape[0]):
        t = table[i]
        decode_gptj_block(x, y, h, u, cat, a, q, k, v, eps, T, act, K[i], V[i], slots, ends, scales[i], cos, sin,
                          _vector(t, 0), _vector(t, 1), _matrix(t, 2, like), _vector(t, 3), _vector(t, 4),
                          _matrix(t, 5, like), _vector(t, 6), _vector(t, 7))
        x, y = y, x
    _decode_head(x, h, eps, T, head, like, logits)


def layer_table(layers) -> np.ndarray:
    """[layers, tensors, 3] int64: each tensor's address, rows and columns (0 for a vector), for
    decode_gpt2 and decode_gptj (a q8 matrix stored as pairs, [4, rows, columns, 2], as its rows
    and columns). The tensors must be C-contiguous and outlive the table."""
    def row(t):
        pairs = t.ndim == 4 and t.shape[0] == 4 and t.shape[3] == 2
        if not t.flags.c_contiguous or t.ndim > 2 and not pairs:
            raise ValueError(f"layer_table takes C-contiguous vectors and matrices, not {t.ndim}-d {t.strides}")
        return (t.ctypes.data, *(t.shape[1:3] if pairs else (t.shape[0], t.shape[1] if t.ndim == 2 else 0)))
    return np.array([[row(t) for t in layer] for layer in layers], np.int64).reshape(len(layers), -1, 3)
