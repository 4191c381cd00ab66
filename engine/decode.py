"""The decode step's blocks, each one compiled call: Model._decode_step runs a step where every
row feeds one token (generate's decode, batched or not) through these.

They call the same kernels on the same arrays as Model.block does with its NumPy glue, in the
same order of float32 operations (no fast-math here), so the logits and the cache are the same
bit for bit (tests/test_batch.py). What they save is the Python between the kernels: one call
a block instead of ~12 (each through numba's dispatcher), no fresh arrays, no views. That
Python costs a step more than its own time, since the weights streaming through push the
interpreter's code and data out of the caches between two kernels: GPT-2-small q8, 2 threads,
4.00-4.24 -> 3.82-4.11 ms a step against the same ~12 calls a block made from Python (one
process, alternating, 64 MB read between steps; four runs). Compiling them takes ~2-3 s per
model dtype, once (numba's cache).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kernels import SMALL, _matvec_cols, _matvec_rows, attend_decode, gelu_tanh, layer_norm

ACTIVATIONS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "relu": 1}   # config name -> code (others: Model.block)


@njit(cache=True, nogil=True, boundscheck=False)
def _gemv(x, w, out, T, scale, bias):   # kernels.matvec, its split chosen by w as there
    if w.nbytes <= SMALL:
        _matvec_cols(x, w, out, T, scale, bias)
    else:
        _matvec_rows(x, w, out, T, scale, bias)


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
def gpt2_block(x, y, h, u, r, mlp, a, q, k, v, eps, T, act, K, V, slots, ends, scale,
               ln1_w, ln1_b, w_qkv, s_qkv, b_qkv, w_o, s_o, b_o, ln2_w, ln2_b, w_in, s_in, b_in, w_out, s_out, b_out):
    """y [N, C] = x through one GPT-2 block; the rest are its buffers (h [N, C], u [N, 3C],
    r [N, C], mlp [N, I], a, q, k, v [N, H, D]), its cache K, V [slots, H, capacity, D] and its
    tensors (each matrix as bits, q8 scale or empty, bias)."""
    N, C = x.shape
    layer_norm(x, ln1_w, ln1_b, eps, h)
    _gemv(h, w_qkv, u, T, s_qkv, b_qkv)
    _split(u, q, k, v)
    attend_decode(q, k, v, K, V, slots, ends, scale, a)
    _gemv(a.reshape(N, C), w_o, r, T, s_o, b_o)
    _add(r, x)
    layer_norm(r, ln2_w, ln2_b, eps, h)
    _gemv(h, w_in, mlp, T, s_in, b_in)
    _activate(mlp.reshape(1, mlp.size), act)   # (in one pass, as model.gelu_new does a contiguous array)
    _gemv(mlp, w_out, y, T, s_out, b_out)
    _add(y, r)


@njit(cache=True, nogil=True, boundscheck=False)
def gptj_block(x, y, h, u, cat, a, q, k, v, eps, T, act, K, V, slots, ends, scale, cos, sin,
               ln_w, ln_b, w_in, s_in, b_in, w_out, s_out, b_out):
    """y [N, C] = x through one GPT-J block (attention and MLP both read h, one GEMM in and one
    out; u [N, 3C + I], cat [N, C + I]); cos, sin [n_ctx, R/2] (R = 0: no rotation)."""
    N, C = x.shape
    layer_norm(x, ln_w, ln_b, eps, h)
    _gemv(h, w_in, u, T, s_in, b_in)
    _split(u, q, k, v)
    _rotate(q, cos, sin, ends)
    _rotate(k, cos, sin, ends)
    attend_decode(q, k, v, K, V, slots, ends, scale, a)
    mlp = u[:, 3 * C:]
    _activate(mlp, act)                          # (row by row, as model.gelu_new does these columns)
    for n in range(N):
        cat[n, :C] = a[n].reshape(C)
        cat[n, C:] = mlp[n]
    _gemv(cat, w_out, y, T, s_out, b_out)
    _add(y, x)
