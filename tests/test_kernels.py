"""The compiled low-precision kernels against NumPy f32 on the same widened weights."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from numba import njit

from gptcpu.engine import blas, kernels
from gptcpu.engine.weights import Packed, bf16_to_f32, f32_to_bf16, pairs, pairs_shape
from test_engine import has_mkl

SHAPES = [(1, 7, 5), (1, 768, 2304), (3, 769, 1001), (2, 130, 257), (8, 64, 513), (1, 1, 1), (5, 33, 256),
          (2, 1030, 2047), (6, 40, 262), (1, 40, 1100)]


def stored(w32: np.ndarray, dtype: str):
    """-> (the bits as kernels take them, the exact f32 values they hold)."""
    if dtype == "f32":   # decode batches of f32 weights run the same kernels
        return w32, w32
    if dtype == "bf16":
        bits = f32_to_bf16(w32)
        return bits, bf16_to_f32(bits)
    if dtype == "f16":
        h = w32.astype(np.float16)
        return h.view(np.int16), h.astype(np.float32)
    q = np.clip(np.rint(w32 * 40), -127, 127).astype(np.int8)
    return q, q.astype(np.float32)


def rounded_to_int16(x: np.ndarray) -> np.ndarray:
    """x as the q8 kernels round it (written here from their docstring, not from their code):
    per row and KC-block, a power-of-two scale s that puts the block's largest |x| in
    16384..32767, each value rounded to the nearest multiple of s (ties to even)."""
    out = np.empty_like(x)
    KC = kernels.KC
    for m in range(x.shape[0]):
        for k0 in range(0, x.shape[1], KC):
            b = x[m, k0:k0 + KC].astype(np.float64)
            amax = np.abs(b).max()
            s = 2.0 ** (np.frexp(amax)[1] - 15) if amax > 0 else 1.0
            if np.rint(amax / s) > 32767:
                s *= 2
            out[m, k0:k0 + KC] = np.rint(b / s) * s
    return out


def int16_x_gemv(bits: np.ndarray) -> bool:
    """Whether the decode GEMV runs these weights against int16 x (_matvec_pairs)."""
    K, N = bits.shape
    return (bits.dtype == np.int8 and kernels.PAIRS and bits.nbytes > kernels.SMALL
            and N % kernels.LANES == 0 and K % 8 == 0)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16", "q8"])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_matvec_kernels_match_numpy(M, K, N, dtype):
    rng = np.random.default_rng(K * N + M)
    w32 = rng.standard_normal((K, N), dtype=np.float32)
    x = rng.standard_normal((M, K), dtype=np.float32)
    bits, exact = stored(w32, dtype)
    want = x @ exact
    scale = np.abs(want).max() + 1e-30
    out = np.empty((M, N), np.float32)
    kernels.matvec(x, bits, out)
    # q8 at decode: against x rounded to int16, the same x that the q8 prefill GEMM takes
    xr = rounded_to_int16(x) if int16_x_gemv(bits) else x
    assert np.abs(out - xr @ exact).max() / scale < 1e-5
    if int16_x_gemv(bits):
        assert np.abs(out - want).max() / scale < 1e-4   # what the rounding costs
        for threads in (1, 2, 3):
            out[...] = np.nan
            kernels._matvec_pairs(x, bits, out, threads, kernels.NONE, kernels.NONE)
            assert np.abs(out - xr @ exact).max() / scale < 1e-5, threads
    for split in (kernels._matvec_rows, kernels._matvec_cols):  # both ways, any thread count
        for threads in (1, 2, 3):
            out[...] = np.nan
            split(x, bits, out, threads, kernels.NONE, kernels.NONE)
            assert np.abs(out - want).max() / scale < 1e-5, (split, threads)
    # the epilogue: a per-column scale, a bias, or both, applied as the sums are stored
    s, b = rng.uniform(0.5, 2, N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    splits = (lambda *a: kernels._matvec_rows(*a[:3], 2, *a[3:]), lambda *a: kernels._matvec_cols(*a[:3], 2, *a[3:]))
    for split in splits:
        for sc, bi in ((s, kernels.NONE), (kernels.NONE, b), (s, b)):
            split(x, bits, out, sc, bi)
            exp = (x @ exact) * (sc if sc.size else 1) + (bi if bi.size else 0)
            assert np.abs(out - exp).max() / (np.abs(exp).max() + 1e-30) < 1e-5, (split, sc.size, bi.size)
    buf = np.empty((K, N), np.float32)
    kernels.gemm(np.eye(K, dtype=np.float32), bits, buf)   # (every other product is 0: exact)
    np.testing.assert_array_equal(buf, exact)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16", "q8"])
@pytest.mark.parametrize("K,N", [(768, 2304), (1030, 777), (200, 5000), (1032, 1040)])
def test_gemv_row_alone_is_bit_for_bit_a_batch_row(dtype, K, N):
    """One row of x (decode alone, the line-at-a-time kernel with its prefetches) and the same
    row among others (a decode batch: four rows a pass, then the plain loop) give the same
    sums, bit for bit."""
    rng = np.random.default_rng(K + N)
    bits, _ = stored(rng.standard_normal((K, N), dtype=np.float32), dtype)
    assert bits.nbytes > kernels.SMALL   # the row split, where the two paths differ
    x = rng.standard_normal((6, K), dtype=np.float32)   # four rows a pass (_four_rows), then two alone
    scale, bias = rng.uniform(0.5, 2, N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    for threads in (1, 2, 3):
        batch, alone = np.empty((6, N), np.float32), np.empty((1, N), np.float32)
        kernels._matvec(x, bits, batch, threads, scale, bias)
        for m in range(6):
            kernels._matvec(x[m:m + 1], bits, alone, threads, scale, bias)
            np.testing.assert_array_equal(alone[0], batch[m])


def test_pairs_layout():
    """q8 weights [K, N] stored as pairs in four stripes: [4, K8/8, N, 2] (K8: K rounded up to
    8), stripe p's row g holding rows 8g + 2p and 8g + 2p + 1 side by side for each column, the
    rows past K zero; copied in blocks of any even number of rows."""
    rng = np.random.default_rng(0)
    for K, N in ((16, 32), (37, 48), (8, 16), (1, 64), (2051, 80)):
        w = rng.integers(-128, 128, (K, N)).astype(np.int8)
        full = np.zeros((-(-K // 8) * 8, N), np.int8)
        full[:K] = w
        want = full.reshape(-1, 4, 2, N).transpose(1, 0, 3, 2)
        for rows in (2, 6, 1024):
            p = pairs(w, rows)
            assert p.shape == pairs_shape((K, N)) == want.shape and p.flags.c_contiguous
            np.testing.assert_array_equal(p, want)


@pytest.mark.skipif(not kernels.PAIRS, reason="this CPU has no int16 pair multiply (AVX2 or AVX-512BW)")
@pytest.mark.parametrize("M,K,N", [(1, 768, 2304), (3, 3072, 768), (8, 1030, 1040), (6, 1029, 4096),
                                   (5, 37, 32), (2, 100, 64), (1, 8, 16), (4, 131, 4096)])
def test_q8_pairs_match_numpy_and_the_rows(M, K, N):
    """The GEMV on q8 weights stored as pairs (a large matrix split by rows, a small one by
    columns; 1-3 threads; with and without scale and bias) against x rounded to int16, as on
    [K, N]; the same bits as [K, N] where that runs on int16 pairs too, and a row alone the same
    bits as in a batch. The prefill GEMM on pairs: the same bits as on [K, N]."""
    rng = np.random.default_rng(M * K + N)
    w = rng.integers(-127, 128, (K, N)).astype(np.int8)
    p, exact = pairs(w), w.astype(np.float32)
    x = rng.standard_normal((M, K), dtype=np.float32)
    xr = rounded_to_int16(x)
    s, b = rng.uniform(0.5, 2, N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    out, rows, alone = (np.full((n, N), np.nan, np.float32) for n in (M, M, 1))
    for threads in (1, 2, 3):
        for sc, bi in ((kernels.NONE, kernels.NONE), (s, b)):
            want = (xr @ exact) * (sc if sc.size else 1) + (bi if bi.size else 0)
            kernels._matvec(x, p, out, threads, sc, bi)
            assert np.abs(out - want).max() / np.abs(want).max() < 1e-5, (threads, sc.size)
            if int16_x_gemv(w):
                kernels._matvec(x, w, rows, threads, sc, bi)
                np.testing.assert_array_equal(out, rows)
            for m in range(M):
                kernels._matvec(x[m:m + 1], p, alone, threads, sc, bi)
                np.testing.assert_array_equal(alone[0], out[m])
    x = rng.standard_normal((13, K), dtype=np.float32)
    g, g2 = np.empty((13, N), np.float32), np.empty((13, N), np.float32)
    for threads in (1, 2, 3):
        kernels._gemm_pairs(x, p, g, s, b, threads)
        kernels._gemm_pairs(x, w, g2, s, b, threads)
        np.testing.assert_array_equal(g, g2)


AVX2 = "+avx,+avx2,+fma,+f16c,+sse4.2,+popcnt,+bmi,+bmi2"   # what a Haswell-class CPU has


def _host_has_avx2() -> bool:
    from llvmlite import binding
    return all(binding.get_host_cpu_features().get(f[1:], False) for f in AVX2.split(","))


@pytest.mark.skipif(not _host_has_avx2(), reason="this CPU has no AVX2 to run the 8-lane kernels on")
def test_kernels_on_eight_lane_vectors():
    """The GEMV and the q8 GEMM as compiled for an AVX2 CPU (8 float lanes, not AVX-512's 16), in
    a process that compiles for one, with numba's cache out of the way: right sums, one row as in
    a batch; the int16 pairs through AVX2's pmaddwd."""
    code = """if 1:
        import numpy as np
        from gptcpu.engine import kernels
        assert kernels.LANES == 8, kernels.LANES
        rng = np.random.default_rng(0)
        for dt in ("bf16", "f16", "q8"):
            for K, N in ((768, 2304), (131, 1001), (40, 1100)):
                w32 = rng.standard_normal((K, N)).astype(np.float32)
                if dt == "q8":
                    w = rng.integers(-127, 128, (K, N)).astype(np.int8); exact = w.astype(np.float32)
                elif dt == "bf16":
                    w = (w32.view(np.uint32) >> 16).astype(np.uint16); exact = (w.astype(np.uint32) << 16).view(np.float32)
                else:
                    h = w32.astype(np.float16); w = h.view(np.int16); exact = h.astype(np.float32)
                x = rng.standard_normal((5, K)).astype(np.float32)
                batch, alone = np.empty((5, N), np.float32), np.empty((1, N), np.float32)
                kernels._matvec(x, w, batch, 2, kernels.NONE, kernels.NONE)
                want = x @ exact
                tol = 1e-4 if dt == "q8" else 1e-5   # (q8 at 768 x 2304: x rounded to int16, _matvec_pairs)
                assert np.abs(batch - want).max() / np.abs(want).max() < tol, (dt, K, N)
                for m in (1, 4):   # one of four rows a pass, and the row after them
                    kernels._matvec(x[m:m + 1], w, alone, 2, kernels.NONE, kernels.NONE)
                    assert np.array_equal(alone[0], batch[m]), (dt, K, N, m)
        assert kernels.PAIRS and not kernels.VNNI
        w = rng.integers(-127, 128, (1024, 1024)).astype(np.int8)   # the GEMV on AVX2's pmaddwd
        x = rng.standard_normal((1, 1024)).astype(np.float32)
        x[0, :128] = np.arange(128)   # a block exact in int16: its sums exact too
        x[0, 128:] = 0
        out = np.empty((1, 1024), np.float32)
        kernels._matvec(x, w, out, 2, kernels.NONE, kernels.NONE)
        assert (out == x[:, :128] @ w[:128].astype(np.float32)).all()
        w = rng.integers(-127, 128, (300, 70)).astype(np.int8)
        x = rng.standard_normal((13, 300)).astype(np.float32)
        out = np.empty((13, 70), np.float32)
        kernels.gemm(x, w, out)   # the q8 prefill GEMM on AVX2's 16-bit pairs
        want = x @ w.astype(np.float32)
        assert np.abs(out - want).max() / np.abs(want).max() < 1e-4
        kernels.gemm(np.eye(300, dtype=np.float32), w, out := np.empty((300, 70), np.float32))
        assert (out == w).all()
        from gptcpu.engine.weights import pairs
        for K, N in ((1024, 1024),):   # stored as pairs: the row split (the column split shares its intrinsic)
            w = rng.integers(-127, 128, (K, N)).astype(np.int8)
            x = rng.standard_normal((5, K)).astype(np.float32)
            batch, alone = np.empty((5, N), np.float32), np.empty((1, N), np.float32)
            kernels._matvec(x, pairs(w), batch, 2, kernels.NONE, kernels.NONE)
            want = x @ w.astype(np.float32)
            assert np.abs(batch - want).max() / np.abs(want).max() < 1e-4, (K, N)
            kernels._matvec(x[4:], pairs(w), alone, 2, kernels.NONE, kernels.NONE)
            assert np.array_equal(alone[0], batch[4]), (K, N)
            kernels.gemm(x, pairs(w), out := np.empty((5, N), np.float32))
            assert np.abs(out - want).max() / np.abs(want).max() < 1e-4, (K, N)
    """
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": AVX2}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_kernels_compile_for_the_full_vector_width():
    """On an AVX-512 CPU the kernels are compiled with LLVM's preference for 256-bit vectors
    turned off (Intel's AVX-512 CPUs have it); where NUMBA_CPU_NAME or NUMBA_CPU_FEATURES say
    what to compile for, that is what numba gets."""
    from numba.core.codegen import get_host_cpu_features

    code = ("import gptcpu.engine.kernels, numba; from numba.core.registry import cpu_target\n"
            "print(numba.config.CPU_FEATURES); print(cpu_target.target_context.codegen()._tm_features)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU_")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    asked, compiled = r.stdout.split()
    host = get_host_cpu_features()
    if "+avx512f" in host.split(","):
        assert asked == host + ",-prefer-256-bit" and compiled.endswith(",-prefer-256-bit")
    else:
        assert asked == "None" and "prefer-256-bit" not in compiled
    r = subprocess.run([sys.executable, "-c", code], env={**env, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": AVX2},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [AVX2, AVX2]


def f16_bits(x: np.ndarray) -> np.ndarray:
    """What the f16 KV cache holds for x: NumPy's round to nearest even, clamped to +-65504."""
    return np.clip(x, -65504, 65504).astype(np.float16).view(np.int16)


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("H,D", [(12, 64), (3, 5), (16, 256)])
def test_attend_decode_matches_numpy_softmax_attention(H, D, kv):
    """Each new token's key and value land at its slot's last position (rounded to f16 in an f16
    cache), and its output is the softmax attention over that slot's first `ends` positions only
    (the rest is never read), the cached values widened exactly."""
    rng = np.random.default_rng(H * D)
    slots, cap = 5, 40
    K = rng.standard_normal((slots, H, cap, D), dtype=np.float32)
    V = rng.standard_normal((slots, H, cap, D), dtype=np.float32)
    if kv == "f16":
        K, V = f16_bits(K), f16_bits(V)
    K0, V0 = K.copy(), V.copy()
    rows_slots, ends = np.array([3, 0, 4], np.int64), np.array([17, 1, 40], np.int64)
    q, k, v = (rng.standard_normal((3, H, D), dtype=np.float32) for _ in range(3))
    out = np.empty((3, H, D), np.float32)
    kernels.attend_decode(q, k, v, K, V, rows_slots, ends, np.float32(0.3), out)
    exact = (lambda a: a.view(np.float16).astype(np.float64)) if kv == "f16" else (lambda a: a.astype(np.float64))
    for r, (s, L) in enumerate(zip(rows_slots, ends)):
        K0[s, :, L - 1], V0[s, :, L - 1] = (k[r], v[r]) if kv == "f32" else (f16_bits(k[r]), f16_bits(v[r]))
        scores = np.einsum("hd,htd->ht", q[r].astype(np.float64), exact(K0[s, :, :L])) * 0.3
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[r], np.einsum("ht,htd->hd", p, exact(V0[s, :, :L])), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(K, K0)   # only the new positions were written
    np.testing.assert_array_equal(V, V0)


F16_EDGES = np.array([0, -0.0, 1, -2.5, 65504, 65519, 65520, 1e6, -1e6, np.inf, -np.inf, 6.1035156e-05,
                      6.1e-05, 5.96e-08, 2.98e-08, 2.9802322e-08, 1e-9, 1 + 2 ** -11, 1 + 3 * 2 ** -11], np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_store_and_load_kv_round_trip(dtype):
    """A prompt chunk's keys [T, H, D] into one slot [H, capacity, D] at t0 and back: exact at
    f32; at f16 the bits NumPy rounds to (nearest even, subnormals, ties, clamped overflow)."""
    rng = np.random.default_rng(7)
    x = np.concatenate([F16_EDGES, *(rng.standard_normal(3000, dtype=np.float32) * s for s in (1e-7, 1e-4, 1, 3e4))])
    x = x[:len(x) // 12 * 12].reshape(-1, 3, 4)                     # [T, H=3, D=4]
    T = x.shape[0]
    slot = np.full((3, T + 9, 4), 77, dtype)
    kernels.store_kv(slot, 5, x)
    want = x.transpose(1, 0, 2) if dtype == np.float32 else f16_bits(x).transpose(1, 0, 2)
    np.testing.assert_array_equal(slot[:, 5:5 + T], want)
    assert (slot[:, :5] == 77).all() and (slot[:, 5 + T:] == 77).all()
    back = np.empty((3, T + 5, 4), np.float32)
    kernels.load_kv(slot, T + 5, back)
    np.testing.assert_array_equal(back[:, 5:], x.transpose(1, 0, 2) if dtype == np.float32
                                  else want.view(np.float16).astype(np.float32))


def test_f16_kv_store_without_f16c():
    """The portable f32 -> f16 rounding (no F16C, or not x86) gives NumPy's bits too."""
    code = ("import numpy as np; from gptcpu.engine import kernels; assert not kernels._F16C; "
            "rng = np.random.default_rng(1); "
            "x = np.concatenate([np.array(%r, np.float32), *(rng.standard_normal(20000).astype(np.float32) * s "
            "for s in (1e-8, 1e-5, 1, 100, 6e4))]).reshape(-1, 1, 1); "
            "d = np.zeros((1, len(x), 1), np.int16); kernels.store_kv(d, 0, x); "
            "assert (d.reshape(-1) == np.clip(x, -65504, 65504).astype(np.float16).view(np.int16).reshape(-1)).all()"
            % [str(v) for v in F16_EDGES.tolist()])
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "GPTCPU_NO_F16C": "1", "NUMBA_CACHE_DIR": cache}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16", "q8"])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (9, 1, 33), (13, 37, 70), (8, 300, 2 * kernels.NC + 5),
                                   (2 * kernels.MR, kernels.KC, kernels.NR), (40, 2 * kernels.KC + 3, 3 * kernels.NR + 1)])
def test_gemm_matches_numpy_on_every_edge(dtype, M, K, N):
    """The prefill GEMM on shapes around its blocks (MR rows, NR and NC columns, KC rows of w):
    full and edge tiles, several k-blocks, panels of unequal width, 1-3 threads, with and without
    scale and bias. q8 where the CPU multiplies int16 pairs: within the bound of x's rounding to
    int16 (per row and KC-block, at most 2^-15 of the block's largest |x|), plus the f32 sums'
    own."""
    rng = np.random.default_rng(M * 1000 + K + N)
    bits, exact = stored(rng.standard_normal((K, N), dtype=np.float32), dtype)
    x = rng.standard_normal((M, K), dtype=np.float32)
    want = x.astype(np.float64) @ exact.astype(np.float64)
    tol = 2e-5 * (np.abs(x).astype(np.float64) @ np.abs(exact).astype(np.float64)).max()
    gemm = kernels._gemm_for(bits)
    if gemm is kernels._gemm_pairs:
        blocks = [slice(k, k + kernels.KC) for k in range(0, K, kernels.KC)]
        tol = tol + 2.0 ** -15 * sum(np.abs(x[:, b]).max(axis=1, keepdims=True) @ np.abs(exact[b]).sum(axis=0, keepdims=True)
                                     for b in blocks) * 2
    s, b = rng.uniform(0.5, 2, N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    for threads in (1, 2, 3):
        for sc, bi in ((kernels.NONE, kernels.NONE), (s, b)):
            exp = want * (sc if sc.size else 1) + (bi if bi.size else 0)
            out = np.full((M, N), np.nan, np.float32)
            gemm(x, bits, out, sc, bi, threads)
            assert (np.abs(out - exp) <= tol).all(), (threads, sc.size)


@pytest.mark.skipif(not kernels.PAIRS, reason="this CPU has no int16 pair multiply (AVX2 or AVX-512BW)")
def test_q8_gemm_quantizes_x_per_row_and_block():
    """The q8 GEMM's int16 x: exact where x is (a power-of-two scale: the identity gives w back,
    bit for bit); each row and KC-block scaled on its own, so a row of huge values, or a NaN,
    changes nothing in the other rows, and a small block beside a huge one keeps its precision;
    a NaN or an infinity reaches its own row's outputs."""
    rng = np.random.default_rng(3)
    K, N = 2 * kernels.KC + 5, 3 * kernels.NR + 3
    w = rng.integers(-127, 128, (K, N)).astype(np.int8)
    out = np.empty((K, N), np.float32)
    kernels.gemm(np.eye(K, dtype=np.float32), w, out)
    np.testing.assert_array_equal(out, w.astype(np.float32))
    x = rng.standard_normal((12, K)).astype(np.float32)
    x[3, :kernels.KC] *= 1e6       # block 0 of row 3: huge; its block 1 stays small
    base = np.empty((12, N), np.float32)
    kernels.gemm(x, w, base)
    y = x.copy()
    y[5] *= 1e20
    y[7, 9] = np.nan
    y[9, 200] = np.inf
    got = np.empty((12, N), np.float32)
    kernels.gemm(y, w, got)
    for m in (0, 1, 2, 3, 4, 6, 8, 10, 11):
        np.testing.assert_array_equal(got[m], base[m])
    assert np.isnan(got[7]).all() and np.isnan(got[9]).all() and np.isfinite(got[5]).all()
    small = x[3:4, kernels.KC:].astype(np.float64) @ w[kernels.KC:].astype(np.float64)
    part = np.empty((1, N), np.float32)
    kernels.gemm(np.ascontiguousarray(x[3:4, kernels.KC:]), np.ascontiguousarray(w[kernels.KC:]), part)
    assert np.abs(part - small).max() <= 1e-4 * np.abs(small).max()


def test_gemm_on_empty_shapes():
    """No rows, no columns, or an empty sum (K = 0: the bias alone)."""
    b = np.arange(5, dtype=np.float32)
    out = np.full((3, 5), np.nan, np.float32)
    kernels.gemm(np.empty((3, 0), np.float32), np.empty((0, 5), np.uint16), out, kernels.NONE, b)
    np.testing.assert_array_equal(out, np.broadcast_to(b, (3, 5)))
    kernels.gemm(np.empty((0, 4), np.float32), np.ones((4, 5), np.int8), np.empty((0, 5), np.float32))
    kernels.gemm(np.ones((3, 4), np.float32), np.ones((4, 0), np.int8), np.empty((3, 0), np.float32))


@pytest.mark.parametrize("dtype", ["bf16", "q8"])
def test_gemm_result_does_not_depend_on_threads_or_rows(dtype):
    """Each output is summed the same way whatever the thread count and whatever other rows
    share the call: a prompt's numbers do not depend on the machine's cores or its batch."""
    rng = np.random.default_rng(5)
    bits, _ = stored(rng.standard_normal((700, 1100), dtype=np.float32), dtype)
    x = rng.standard_normal((37, 700), dtype=np.float32)
    outs = []
    for threads, rows in ((1, 37), (2, 37), (3, 37), (2, 20)):
        out = np.empty((rows, 1100), np.float32)
        kernels._gemm_for(bits)(x[:rows], bits, out, kernels.NONE, kernels.NONE, threads)
        outs.append(out)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0][:len(o)])


def test_gelu_tanh_within_1e6_of_the_exact_formula():
    """GELU's tanh as a rational function: within 1e-6 absolute of the float64 formula from -30
    to 30 (and on wide random values), the same zeros, infinities and NaNs."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-30, 30, 600_001, dtype=np.float32),
                        (rng.standard_normal(100_003) * 4).astype(np.float32),
                        np.array([0, -0.0, 1e-30, -1e-40, 3e38, -3e38, np.inf, -np.inf, np.nan], np.float32)])
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        exact = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)))
    y = x.copy()
    kernels.gelu_tanh(y)
    finite = np.isfinite(exact)
    assert np.abs(y[finite] - exact[finite]).max() <= 1e-6
    assert np.array_equal(y[~finite], exact[~finite].astype(np.float32), equal_nan=True)
    assert np.array_equal(np.signbit(y[x == 0]), np.signbit(x[x == 0]))


@njit
def _exp_each(x, out):
    for i in range(x.size):
        out[i] = kernels._exp(x[i])


def test_attention_exp_within_2e7_of_e_to_the_x():
    """attend_decode's softmax exponential, on the scores less their largest (x <= 0): within
    2e-7 of e^x absolute (NumPy's float32 exp: 1.2e-7), so each probability is, and relative
    4e-6 where y = x log2(e) rounds; below -87 about 2^-126, not an underflow to 0."""
    x = np.concatenate([-np.linspace(0, 87, 2_000_001, dtype=np.float32), np.array([-0.0, -1e-30], np.float32)])
    out = np.empty_like(x)
    _exp_each(x, out)
    exact = np.exp(x.astype(np.float64))
    assert np.abs(out - exact).max() <= 2e-7
    assert (np.abs(out - exact) / exact).max() <= 4e-6
    tail = np.array([-87.3, -100, -1e4, -np.inf], np.float32)
    _exp_each(tail, out[:4])
    assert ((out[:4] > 0) & (out[:4] < 2e-38)).all()


@njit
def _from_table(t, like):
    return kernels._vector(t, 0).copy(), kernels._matrix(t, 1, like).copy()


def test_layer_table_gives_the_compiled_code_each_tensor_back():
    """The decode step's layers reach the compiled code as (address, rows, columns) rows of an
    int64 table (kernels.layer_table), made arrays again there (_vector, _matrix)."""
    v, m = np.arange(5, dtype=np.float32) / 3, np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    t = kernels.layer_table([(v, m)])
    assert t.tolist() == [[[v.ctypes.data, 5, 0], [m.ctypes.data, 3, 4]]]
    v2, m2 = _from_table(t[0], np.empty(0, np.int8))
    np.testing.assert_array_equal(v2, v)
    np.testing.assert_array_equal(m2, m)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.layer_table([(v, m.T)])
    p = pairs(np.arange(-128, 128, dtype=np.int8).reshape(16, 16))   # q8 stored as pairs: [4, 2, 16, 2]
    t = kernels.layer_table([(v, p)])
    assert t.tolist() == [[[v.ctypes.data, 5, 0], [p.ctypes.data, 2, 16]]]
    np.testing.assert_array_equal(_from_table(t[0], np.empty((4, 0, 0, 2), np.int8))[1], p)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.layer_table([(v, p.reshape(2, 4, 16, 2))])   # (not four stripes)


def test_gelu_new_same_on_every_layout():
    """The model's GELU: contiguous rows, a column slice (GPT-J's prefill), anything else."""
    from gptcpu.engine.model import gelu_new

    u = (np.random.default_rng(1).standard_normal((5, 300)) * 3).astype(np.float32)
    whole = u.copy()
    kernels.gelu_tanh(whole.reshape(-1))
    cols = u.copy()
    gelu_new(cols[:, 100:])
    np.testing.assert_array_equal(cols[:, :100], u[:, :100])
    np.testing.assert_array_equal(cols[:, 100:], whole[:, 100:])
    strided = u.copy()
    gelu_new(strided[:, ::2])
    np.testing.assert_allclose(strided[:, ::2], whole[:, ::2], atol=2e-6)
    np.testing.assert_array_equal(strided[:, 1::2], u[:, 1::2])


def test_f16_widening_is_exact_for_every_finite_half():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16)
    finite = np.isfinite(bits.view(np.float16))
    bits = bits[finite].reshape(1, -1)
    out = np.empty(bits.shape, np.float32)
    kernels.gemm(np.ones((1, 1), np.float32), bits, out)
    np.testing.assert_array_equal(out, bits.view(np.float16).astype(np.float32))


def test_f16_portable_widening_is_exact_too():
    """Without F16C the kernels widen f16 with integer ops; same exhaustive check, in a process
    where that path is forced (and numba's cache is out of the way)."""

    code = ("import numpy as np; from gptcpu.engine import kernels; assert not kernels._F16C; "
            "b = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16); "
            "b = b[np.isfinite(b.view(np.float16))].reshape(1, -1); o = np.empty(b.shape, np.float32); "
            "kernels.gemm(np.ones((1, 1), np.float32), b, o); assert (o == b.view(np.float16).astype(np.float32)).all()")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "GPTCPU_NO_F16C": "1", "NUMBA_CACHE_DIR": cache}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("dtype", ["bf16", "f16", "q8"])
@pytest.mark.parametrize("M", [1, 8, 9, 40])
def test_packed_matmul_every_path(dtype, M):
    """Decode (compiled GEMV) and prefill (compiled GEMM) paths, scales; the row gather of an
    embedding table [N, K] (q8: a scale per row)."""
    rng = np.random.default_rng(M)
    K, N = 96, 5000
    w32 = rng.standard_normal((K, N), dtype=np.float32)
    bits, exact = stored(w32, dtype)
    scale = rng.uniform(0.5, 2, N).astype(np.float32) if dtype == "q8" else None
    x = rng.standard_normal((M, K), dtype=np.float32)
    # (bf16 prefill on MKL's bf16 GEMM rounds x to bf16: test_bf16_prefill_on_mkls_bf16_gemm)
    xr = bf16_to_f32(f32_to_bf16(x)) if dtype == "bf16" and M > Packed.MATVEC_ROWS and amx_active() else x
    want = xr @ (exact * scale if scale is not None else exact)
    got = x @ Packed(bits.view(np.uint16) if dtype == "f16" else bits, dtype, scale)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
    table = Packed(np.ascontiguousarray((bits.view(np.uint16) if dtype == "f16" else bits).T), dtype, scale)
    rows = table.rows(np.array([0, 7, N - 1]))
    np.testing.assert_array_equal(rows, (exact * scale if scale is not None else exact).T[[0, 7, N - 1]])


def amx_active() -> bool:
    return getattr(blas.active(), "amx_bf16", False)


def test_round_bf16_rounds_as_torch():
    """The compiled rounding of prefill's activations gives weights.f32_to_bf16's bits (to
    nearest even, as torch): ties both ways, subnormals, the largest floats, infinities, NaN."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(4000).astype(np.float32) * 10,
                        (rng.integers(0, 1 << 16, 2000, dtype=np.uint32) << 16 | 0x8000).view(np.float32),  # ties
                        np.array([0, -0.0, 1e-45, -1e-40, 3.4e38, -3.4e38, np.inf, -np.inf, np.nan], np.float32)])
    x = x[:len(x) // 7 * 7].reshape(7, -1)
    out = np.empty(x.shape, np.uint16)
    kernels.round_bf16(x, out)
    np.testing.assert_array_equal(out, f32_to_bf16(x))
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = np.isfinite(x)
    np.testing.assert_array_equal(out[finite], want[finite])


@pytest.mark.skipif(not (has_mkl() and "amx_bf16" in blas.cpuinfo("flags").split()),
                    reason="needs the mkl extra and a CPU with AMX-BF16 (where MKL's bf16 GEMM runs bf16 prefill)")
def test_bf16_prefill_on_mkls_bf16_gemm():
    """With MKL on a CPU with AMX-BF16, a bf16 matrix times more than MATVEC_ROWS rows runs MKL's
    bf16 GEMM: x rounded to bf16, f32 sums, the bias added. Up to MATVEC_ROWS rows stay on the
    compiled GEMV with x in f32."""
    code = """if 1:
        import numpy as np
        from gptcpu.engine import blas
        from gptcpu.engine.weights import Packed, bf16_to_f32, f32_to_bf16, pairs, pairs_shape
        blas.use("mkl", "openmp")
        assert blas.active().amx_bf16
        rng = np.random.default_rng(0)
        for M, K, N in ((9, 96, 5000), (40, 769, 1001), (129, 1030, 257), (8, 300, 700)):
            bits = f32_to_bf16(rng.standard_normal((K, N), dtype=np.float32))
            x = rng.standard_normal((M, K), dtype=np.float32)
            b = rng.standard_normal(N).astype(np.float32)
            xr = bf16_to_f32(f32_to_bf16(x)) if M > Packed.MATVEC_ROWS else x
            want = xr @ bf16_to_f32(bits)
            w = Packed(bits, "bf16")
            for bias in (None, b):
                exp = want if bias is None else want + bias
                err = np.abs(w.matmul(x, bias) - exp).max() / np.abs(exp).max()
                assert err < 1e-6, (M, K, N, bias is None, err)
                if M > Packed.MATVEC_ROWS:   # not x in f32: the rounding is real
                    assert np.abs(x @ bf16_to_f32(bits) - exp).max() / np.abs(exp).max() > 1e-4
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
