"""Compiled kernels for decode: GEMV over weights of any dtype (low-precision ones converted in
registers, never in memory) and attention over a KV cache.

A decode step reads every weight once, so its speed is bandwidth / bytes per weight: bf16 and
f16 weights read half the bytes of f32, int8 a quarter. BLAS has no fast half-precision GEMV on
most CPUs and NumPy's casts run near 1 GB/s, so these loops are compiled with numba, with
`parallel=True` over the numba threading layer that engine.blas picks.

Weights are passed as raw bits, their NumPy type saying what they hold: bf16 as uint16, f16 as
int16 (a view of the float16 bits), q8 as int8 (its per-output-channel scale applied after),
f32 as float32. All of decode runs on this one thread pool (prefill's GEMMs on the BLAS's).
f16 bits are widened exactly for every finite value (the converter refuses weights that
overflow f16), subnormals included.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic, overload

from . import threads

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


BLOCK = 256   # matvec_t: output rows per parallel task
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


NONE = np.empty(0, np.float32)   # matvec: no scale, no bias


def matvec(x, w, out, scale=NONE, bias=NONE):
    """out[M, N] = x[M, K] @ w[K, N] (* scale[N]) (+ bias[N]) for a small M (decode), w in its
    stored bits; q8's per-channel scale and the bias are applied as the sums are stored (two
    NumPy passes fewer a matrix: GPT-2-small q8 3.58 -> 3.49 and 3.41 -> 3.37 ms a token, bf16
    6.56 -> 6.52; the same logits, bit for bit, as multiplying, then adding, after).

    Each of the T threads streams a contiguous range of whole rows of w, eight at a time, and
    the partial sums are added at the end; with several rows of x the weights are read once for
    all of them (GPT-2-small f32, M=2: 8.2 ms against 17.1 reading them once per row). A matrix
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
    """
    T = threads.kernel_threads()
    if w.nbytes <= SMALL:
        _matvec_cols(x, w, out, T, scale, bias)
    else:
        _matvec_rows(x, w, out, T, scale, bias)


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True, inline="always")
def _epilogue(s, scale, bias, j):   # a stored sum: times its scale, plus its bias (either may be empty)
    if scale.size:
        s *= scale[j]
    if bias.size:
        s += bias[j]
    return s


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


@njit(parallel=True, fastmath=True, boundscheck=False, cache=True, nogil=True)
def _matvec_rows(x, w, out, threads, scale, bias):
    """matvec, each thread streaming a contiguous range of rows front to back, eight rows at a
    time in column chunks that stay in L1 while every row of x uses them; partial sums added."""
    M, K = x.shape
    N = w.shape[1]
    T = min(threads, max(1, K // 16))
    # np.zeros, and `out += part[t]` below, would each be a parallel loop of their own: three
    # fork-joins a call, not one (GPT-2-small q8 4.15 -> 4.04 ms a token, the same sums)
    part = np.empty((T, M, N), np.float32)
    step = (K + T - 1) // T
    line = prefetch_line(w)
    ahead = line > 0 and M == 1
    # equal chunks (GPT-2's 2304 columns: 3 x 768, not 1024 + 1024 + 256), so that the prefetch
    # of the next chunk, or of the next rows' first, covers exactly what comes next: with a short
    # last chunk, the next rows' first went unfetched (GPT-2-small q8 w_qkv 54 -> 42 us a call,
    # decode 4.01 -> 3.85 ms a token, interleaved in one process)
    chunks = (N + CHUNK - 1) // CHUNK
    width = ((N + chunks - 1) // chunks + 63) // 64 * 64
    for t in prange(T):
        k, k1 = t * step, min(K, t * step + step)
        acc = part[t]
        for m in range(M):
            for j in range(N):
                acc[m, j] = 0
        while k + 8 <= k1:
            for c0 in range(0, N, width):
                c1 = min(N, c0 + width)
                r0, r1, r2, r3 = w[k, c0:c1], w[k + 1, c0:c1], w[k + 2, c0:c1], w[k + 3, c0:c1]
                r4, r5, r6, r7 = w[k + 4, c0:c1], w[k + 5, c0:c1], w[k + 6, c0:c1], w[k + 7, c0:c1]
                if ahead:  # the same sums, a line of each row at a time, each with its prefetch
                    # of what comes next: these rows' next chunk, or the next eight rows' first
                    kp, cp = (k, c0 + width) if c0 + width < N else (min(k + 8, K - 8), 0)
                    x0, x1, x2, x3 = x[0, k], x[0, k + 1], x[0, k + 2], x[0, k + 3]
                    x4, x5, x6, x7 = x[0, k + 4], x[0, k + 5], x[0, k + 6], x[0, k + 7]
                    p0, p1, p2, p3 = w[kp, cp:], w[kp + 1, cp:], w[kp + 2, cp:], w[kp + 3, cp:]
                    p4, p5, p6, p7 = w[kp + 4, cp:], w[kp + 5, cp:], w[kp + 6, cp:], w[kp + 7, cp:]
                    a = acc[0, c0:c1]
                    jb = 0
                    while jb + line <= c1 - c0:
                        _prefetch(p0, jb)
                        _prefetch(p1, jb)
                        _prefetch(p2, jb)
                        _prefetch(p3, jb)
                        _prefetch(p4, jb)
                        _prefetch(p5, jb)
                        _prefetch(p6, jb)
                        _prefetch(p7, jb)
                        for j in range(jb, jb + line):
                            a[j] += (x0 * widen(r0[j]) + x1 * widen(r1[j]) + x2 * widen(r2[j]) + x3 * widen(r3[j])
                                     + x4 * widen(r4[j]) + x5 * widen(r5[j]) + x6 * widen(r6[j]) + x7 * widen(r7[j]))
                        jb += line
                    for j in range(jb, c1 - c0):
                        a[j] += (x0 * widen(r0[j]) + x1 * widen(r1[j]) + x2 * widen(r2[j]) + x3 * widen(r3[j])
                                 + x4 * widen(r4[j]) + x5 * widen(r5[j]) + x6 * widen(r6[j]) + x7 * widen(r7[j]))
                    continue   # (not the loop below from column jb: LLVM stopped vectorizing it, 14x slower)
                for m in range(M):
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
    for m in range(M):   # part[0] + part[1] + ..., in that order
        for j in range(N):
            s = part[0, m, j]
            for t in range(1, T):
                s += part[t, m, j]
            out[m, j] = _epilogue(s, scale, bias, j)


@njit(parallel=True, fastmath=True, boundscheck=False, cache=True, nogil=True)
def matvec_t(x, w, out, scale, bias):
    """out[M, N] = x[M, K] @ w[N, K].T (* scale[N]) (+ bias[N]) for a small M: the tied LM head
    reads the embedding [V, C]. scale and bias as in matvec, applied to each block of rows while
    it is in cache.

    Dot products along K. Four rows of x at a time go against four weight rows at a time (16
    sums, which LLVM keeps in vector registers: 8 loads per 16 FMAs); the rows of x left over
    (all of them at M < 4) take one weight row at a time, a plain dot product read front to back.
    GPT-2-small's head, f32, 2 threads, M=8: 5.0 ms against 18.2 for one weight row at a time
    and 10.4 for OpenBLAS's sgemm. At M=1 from memory (page-cache mapped, as loaded), bf16/f16
    1.9-2.1 -> 1.4-1.6 ms and q8 0.80-0.93 -> 0.70-0.81 against four weight rows read side by
    side (f32 the same, ~3 ms); M=2 bf16 2.9 -> 1.7, q8 1.8 -> 1.1. With four rows of x at
    int8, the next four weight rows are prefetched while these are summed (see matvec): M=8
    3.7 ms without, 2.4 with; the one-row dot products go faster without.
    """
    M, K = x.shape
    N = w.shape[0]
    nblk = (N + BLOCK - 1) // BLOCK
    m4 = M - M % 4                   # rows of x taken four at a time
    burst = prefetch_line(w) == 64   # int8: ask for the next four rows while these are summed
    for b in prange(nblk):
        n0, n1 = b * BLOCK, min(N, b * BLOCK + BLOCK)
        n4 = n0 + (n1 - n0) // 4 * 4 if m4 else n0   # weight rows [n0, n4) go four at a time
        for n in range(n0, n4, 4):
            r0, r1, r2, r3 = w[n], w[n + 1], w[n + 2], w[n + 3]
            if burst:
                nb = min(n + 4, N - 4)
                p0, p1, p2, p3 = w[nb], w[nb + 1], w[nb + 2], w[nb + 3]
                for k in range(0, K, 64):
                    _prefetch(p0, k)
                    _prefetch(p1, k)
                    _prefetch(p2, k)
                    _prefetch(p3, k)
            for m in range(0, m4, 4):
                a0, a1, a2, a3 = x[m], x[m + 1], x[m + 2], x[m + 3]
                s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0)
                s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0)
                for k in range(K):
                    w0, w1, w2, w3 = widen(r0[k]), widen(r1[k]), widen(r2[k]), widen(r3[k])
                    v0, v1, v2, v3 = a0[k], a1[k], a2[k], a3[k]
                    s00 += v0 * w0
                    s01 += v0 * w1
                    s02 += v0 * w2
                    s03 += v0 * w3
                    s10 += v1 * w0
                    s11 += v1 * w1
                    s12 += v1 * w2
                    s13 += v1 * w3
                    s20 += v2 * w0
                    s21 += v2 * w1
                    s22 += v2 * w2
                    s23 += v2 * w3
                    s30 += v3 * w0
                    s31 += v3 * w1
                    s32 += v3 * w2
                    s33 += v3 * w3
                out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = s00, s01, s02, s03
                out[m + 1, n], out[m + 1, n + 1], out[m + 1, n + 2], out[m + 1, n + 3] = s10, s11, s12, s13
                out[m + 2, n], out[m + 2, n + 1], out[m + 2, n + 2], out[m + 2, n + 3] = s20, s21, s22, s23
                out[m + 3, n], out[m + 3, n + 1], out[m + 3, n + 2], out[m + 3, n + 3] = s30, s31, s32, s33
        for n in range(n0, n1):      # what is left: one weight row at a time
            row = w[n]
            for m in range(m4 if n < n4 else 0, M):
                a = x[m]
                s = np.float32(0)
                for k in range(K):
                    s += a[k] * widen(row[k])
                out[m, n] = s
        if scale.size or bias.size:
            for m in range(M):
                for n in range(n0, n1):
                    out[m, n] = _epilogue(out[m, n], scale, bias, n)


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
        top = np.float32(-np.inf)
        for t in range(L):
            for d in range(0, D, step):
                _prefetch(Kf, (t + 8) * D + d)
                if t < Ln:
                    _prefetch(Kn, t * D + d)
            kt = Ks[t]
            acc = np.float32(0)
            for d in range(D):
                acc += qv[d] * widen(kt[d])
            acc *= scale
            p[t] = acc
            top = max(top, acc)
        total = np.float32(0)
        for t in range(L):
            e = np.exp(p[t] - top)
            p[t] = e
            total += e
        o = out[r, h]
        o[:] = 0
        for t in range(L):
            for d in range(0, D, step):
                _prefetch(Vf, (t + 8) * D + d)
                if t < Ln:
                    _prefetch(Vn, t * D + d)
            pt, vt = p[t], Vs[t]
            for d in range(D):
                o[d] += pt * widen(vt[d])
        inv = np.float32(1) / total
        for d in range(D):
            o[d] *= inv


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


LANES = 16   # widen_into: floats per 64-byte line
STAGE = 1024  # widen_into: floats widened at a time into a 4 KB block in L1, then streamed out
#                (GPT-J width's 8 bf16 matrices: 102 ms; 4096 floats: 142; widening in IR: 105)


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


@intrinsic
def _stream_line(typingctx, src, i, dst, j):
    """dst[j:j+LANES] = src[i:i+LANES] (float32), stored past the caches (a non-temporal store;
    &dst[j] must be 64-byte aligned). Callers end with _store_fence."""
    sig = types.void(src, i, dst, j)

    def codegen(context, builder, signature, args):
        from llvmlite import ir
        from numba.core import cgutils

        sty, _, dty, _ = signature.args
        vec = ir.VectorType(ir.FloatType(), LANES).as_pointer()

        def line(ty, ary, k):   # a pointer to the LANES floats from ary[k]
            a = context.make_array(ty)(context, builder, ary)
            return builder.bitcast(cgutils.get_item_pointer(context, builder, ty, a, [k], wraparound=False), vec)

        store = builder.store(builder.load(line(sty, args[0], args[1]), align=4), line(dty, args[2], args[3]), align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _store_fence(typingctx):
    """Order the non-temporal stores before everything after (they are weakly ordered, and the
    BLAS's threads on other cores read what they wrote next): SFENCE on x86, a full fence elsewhere."""
    def codegen(context, builder, signature, args):
        import platform

        from llvmlite import ir
        from numba.core import cgutils

        if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
            builder.call(fn, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(fastmath=True, boundscheck=False, cache=True, nogil=True)
def _widen_flat(src, dst):
    """dst = widen(src), 1-D: `widen` into an L1 staging block, then its lines to dst streamed."""
    n = src.shape[0]
    i = min(n, (64 - dst.ctypes.data % 64) % 64 // 4)   # up to the first 64-byte line of dst
    for j in range(i):
        dst[j] = widen(src[j])
    stage = np.empty(STAGE, np.float32)
    while i + LANES <= n:
        m = min(STAGE, (n - i) // LANES * LANES)
        part = src[i:i + m]
        for j in range(m):
            stage[j] = widen(part[j])
        for j in range(0, m, LANES):
            _stream_line(stage, j, dst, i + j)
        i += m
    for j in range(i, n):
        dst[j] = widen(src[j])
    _store_fence()


def widen_into(w, out):
    """out[K, N] f32 = w[K, N] widened, for prefill's sgemm (both C-contiguous).

    Its stores bypass the caches: the block (up to Packed.PREFILL_BYTES) is far larger than
    them, so an ordinary store would first read every line of out from memory only to overwrite
    it, and would push the GEMM's operands out on the way. GPT-J-width bf16, the 8 weight
    matrices of 4 layers, one thread: 134 ms with ordinary stores, 97-107 with these; 128-token
    prefill 0.83-0.86 s -> 0.76-0.80 s (f32 0.65). One thread on purpose: it is a small part of
    prefill, and a parallel region here leaves numba's workers spinning against the BLAS's
    threads during the GEMM that follows (GPT-2-small bf16, 2 threads: prefill ran at 523-776
    tok/s with it, ~1,050 without)."""
    if out.dtype != np.float32 or out.shape != w.shape or not (w.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("widen_into: out must be float32, w's shape, and both C-contiguous")
    if out.ctypes.data % 4:
        raise ValueError("widen_into: out must be float32-aligned")
    _widen_flat(w.reshape(-1), out.reshape(-1))


def small_matmul(x, w, bias=None):
    """x [M, K] @ w (+ bias) for f32 weights and M <= 8 (decode) in one pass over w, where
    OpenBLAS's sgemm would first copy all of w into its packed layout at M > 1 (GPT-2-small's
    matrices, 2 threads, M=8: 13.3 ms against 18.3). w is [K, N] C-contiguous, or the transpose
    of a C-contiguous [N, K] (the tied LM head). -> None for any other layout (use the BLAS)."""
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    if w.flags.c_contiguous:
        matvec(x, w, out, NONE, NONE if bias is None else bias)
    elif w.T.flags.c_contiguous:
        matvec_t(x, w.T, out, NONE, NONE if bias is None else bias)
    else:
        return None
    return out


def warm_up() -> None:
    """Run one tiny kernel, which starts the threading layer (and compiles, or loads the cache)."""
    x = np.ones((1, 4), np.float32)
    matvec(x, np.ones((4, 4), np.int8), np.empty((1, 4), np.float32))
