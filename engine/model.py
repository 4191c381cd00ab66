"""The forward pass of GPT-2 and GPT-J, written as the math over NumPy float32 arrays.

Shape letters: B batch, T new tokens this step, N rows (a step's B x T tokens, or a ragged
batch's), S slots attended (cached + new), C n_embd, H n_head, D head_dim, R rotary_dim,
I n_inner, V n_vocab. Weights are stored [in, out], so
every linear layer is `x @ w + b`. Everything stays float32: no float64 on the hot path.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from pathlib import Path

import numpy as np

from . import blas, kernels, threads
from .config import Config
from .errors import GptcpuError
from .kv_cache import KVCache, SlotCache, kv_dtype
from .weights import Packed, mmap_tensors, pairs_shape, transposed

F32 = np.float32
MASKED = np.finfo(F32).min  # added to masked scores: exp() underflows to 0 without inf - inf = NaN


def check_ids(ids, n_vocab: int) -> None:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
        raise GptcpuError(f"token id {ids.max() if ids.max() >= n_vocab else ids.min()} is outside "
                          f"the vocabulary of {n_vocab}")


def linear(x, w, b=None):  # [N, in], [in, out], [out] -> [N, out], a fresh array
    # one GEMM (GEMV at one row), whatever the batch; a Packed w runs its compiled kernel, and
    # so does an f32 w at decode (1 to 8 rows): BLAS's sgemm handles 2-8 rows badly, and a
    # decode step that ran both BLAS's threads and the kernels' (attention) would have each
    # pool spinning against the other (GPT-2-small at batch 1, 2 threads: 32 ms/step, 13.5 with one)
    if isinstance(w, Packed):
        return w.matmul(x, b)   # (the bias added in the kernel)
    y = kernels.small_matmul(np.ascontiguousarray(x), w, b) if len(x) <= Packed.MATVEC_ROWS and w.dtype == F32 else None
    if y is not None:
        return y
    y = blas.matmul(x, w)
    if b is not None:
        y += b
    return y


def _decode_arg(layer, name):  # a block's tensor(s) as kernels.decode_*_block take them, or None
    if name.startswith("ln_"):
        return layer[name + ".weight"], layer[name + ".bias"]
    w, b = layer[name], layer[name.replace("w_", "b_", 1)]
    if isinstance(w, Packed):
        return w.bits, kernels.NONE if w.scale is None else w.scale, b
    return (w, kernels.NONE, b) if w.dtype == F32 and w.flags.c_contiguous else None


def layer_norm(x, w, b, eps):  # [N, C] -> [N, C], a fresh array
    x = np.ascontiguousarray(x, dtype=F32)
    out = np.empty_like(x)
    kernels.layer_norm(x, w, b, F32(eps), out)
    return out


def gelu_new(x):  # in place: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    if x.flags.c_contiguous:
        kernels.gelu_tanh(x.reshape(-1))
    elif x.ndim == 2 and x.strides[1] == x.itemsize:   # GPT-J's prefill: columns of a wider GEMM's rows
        for row in x:
            kernels.gelu_tanh(row)
    else:
        _gelu_numpy(x)
    return x


def _gelu_numpy(x):
    t = x * x
    t *= F32(0.044715)
    t += 1
    t *= x
    t *= F32(math.sqrt(2 / math.pi))
    np.tanh(t, out=t)
    t += 1
    x *= t
    x *= F32(0.5)
    return x


def erf(x):  # exact, element by element (slow): only for the rare configs that ask for erf GELU
    return np.frompyfunc(math.erf, 1, 1)(x).astype(F32)


ACTIVATIONS = {
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,
    "gelu": lambda x: x * F32(0.5) * (1 + erf(x * F32(1 / math.sqrt(2)))),
    "relu": lambda x: np.maximum(x, 0, out=x),
}


def _row_groups(lengths) -> list:
    """Runs of `lengths` rows -> row groups: the one-row runs together, in groups of at most
    Packed.MATVEC_ROWS (index arrays), then each longer run on its own (slices)."""
    if len(lengths) == 1 or (len(lengths) <= Packed.MATVEC_ROWS and max(lengths) == 1):
        return [slice(0, sum(lengths))]   # the common steps: one group, all rows in order
    starts = np.cumsum([0] + list(lengths[:-1]))
    single = np.array([s for s, n in zip(starts, lengths) if n == 1], np.int64)
    groups = [single[j:j + Packed.MATVEC_ROWS] for j in range(0, len(single), Packed.MATVEC_ROWS)]
    groups += [slice(s, s + n) for s, n in zip(starts, lengths) if n > 1]
    if len(groups) == 1 and isinstance(groups[0], np.ndarray) and len(groups[0]) == sum(lengths):
        return [slice(0, len(groups[0]))]   # all rows, in order: one group
    return groups


def _grouped(f, x, groups):  # f over rows [n, C] -> [n, out], group by group -> [N, out]
    out = None
    for rows in groups:
        y = f(x[rows])
        if out is None:
            out = np.empty((len(x), y.shape[-1]), F32)
        out[rows] = y
    return out


def embed(table, idx):  # [rows, C] f32 or Packed, int [...] -> [..., C] float32, a fresh array
    return table.rows(idx) if isinstance(table, Packed) else table[idx]


def _f32(kv, S):  # one slot's cached keys or values [H, capacity, D] -> its first S, [1, H, S, D] float32
    if kv.dtype == F32:
        return kv[None, :, :S]
    out = np.empty((1, kv.shape[0], S, kv.shape[2]), F32)   # an f16 cache's, widened
    kernels.load_kv(kv, S, out[0])
    return out


def softmax_(x):  # in place over the last axis
    x -= x.max(-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(-1, keepdims=True)
    return x


def rotary_tables(n_ctx: int, rotary_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n_ctx, R/2], computed in float32 exactly as GPT-J's reference does."""
    inv_freq = F32(1) / F32(10000) ** (np.arange(0, rotary_dim, 2, dtype=F32) / F32(rotary_dim))
    angles = np.arange(n_ctx, dtype=F32)[:, None] * inv_freq
    return np.cos(angles), np.sin(angles)


def rotate_(x, cos, sin):  # in place on x [B, T, H, D]; cos, sin [B, T, 1, R/2]
    # GPT-J rotates interleaved pairs (x0, x1), (x2, x3), ... of the first R dims of each head
    R = 2 * cos.shape[-1]
    x1, x2 = x[..., 0:R:2].copy(), x[..., 1:R:2].copy()
    x[..., 0:R:2] = x1 * cos - x2 * sin
    x[..., 1:R:2] = x2 * cos + x1 * sin


QUERY_BLOCK = 128   # attention: prompt rows scored at a time


def attention(q, k, v, bias, scale):  # [B,H,T,D], [B,H,S,D], [B,H,S,D], [B,1,T,S]|None -> [B,T,H*D]
    """Causal softmax attention of T new rows over S = (cached + T) keys, QUERY_BLOCK rows at a
    time, each block against the keys up to its last row only: the keys after that are masked
    for all of its rows (their softmax terms are exactly 0), so a long prompt scores about half
    of the T x S matrix, and never all of it at once (GPT-J's 2,048 tokens: 268 MB of scores a
    layer). GPT-2-small, 1,024 tokens, 2 threads: prefill bf16 1.09 -> 0.86 s, f32 1.22 -> 0.76;
    GPT-J width (4 layers) bf16, 2,048 tokens: 16.1 -> 11.6 s; a 128-token prompt is one block.
    The queries are scaled, not the scores: GPT-2-small bf16 at 1,024 tokens 866 -> 812 ms, the
    same logits bit for bit where the scale is a power of two (1/sqrt(64), 1/sqrt(256))."""
    B, H, T, D = q.shape
    S = k.shape[2]
    out = np.empty((B, T, H, D), F32)
    for b0 in range(0, T, QUERY_BLOCK):
        b1 = min(T, b0 + QUERY_BLOCK)
        s_end = S - T + b1                                          # the keys rows b0:b1 may see
        qs = q[:, :, b0:b1] * F32(scale)
        s = qs @ k[:, :, :s_end].transpose(0, 1, 3, 2)              # [B, H, b1 - b0, s_end]
        if bias is not None:
            s += bias[:, :, b0:b1, :s_end]
        out[:, b0:b1] = (softmax_(s) @ v[:, :, :s_end]).transpose(0, 2, 1, 3)
    return out.reshape(B, T, H * D)


class Model:
    """A loaded gptcpu model: config, weights (mmap'd: no copy but a tied LM head's transpose and
    q8 matrices stored as pairs, _as_pairs), tokenizer."""

    def __init__(self, config: Config, weights: dict[str, np.ndarray], tokenizer=None, path: Path | None = None,
                 kv_cache: str | None = None):
        self.config = config
        # the KV cache of generation and serving: f32 beside f32 weights, else f16, whose rounding
        # (2^-11 relative) is well below that of bf16, f16 or q8 weights
        self.kv_cache = kv_cache or ("f32" if config.dtype == "f32" else "f16")
        kv_dtype(self.kv_cache)   # a bad name fails at load, not at the first generate
        self.w = weights
        # each layer's tensors by their names within the layer ("ln_1.weight", "attn.w_qkv", ...)
        self.layers = [{name[len(p):]: t for name, t in weights.items() if name.startswith(p)}
                       for p in (f"blocks.{i}." for i in range(config.n_layer))]
        # 1 / sqrt(head_dim), and / (layer + 1) where the config asks (GPT-2's option)
        self.attn_scale = [F32(1 / math.sqrt(config.head_dim) / ((i + 1) if config.scale_attn_by_inverse_layer_idx else 1))
                           for i in range(config.n_layer)]
        # bf16/f16/q8 weights: every GEMM runs on the kernels' pool, and prefill's attention on
        # NumPy's BLAS on this thread alone (two pools taking turns wake each other's threads);
        # set once per forward pass around its layers, not once per layer
        packed = any(isinstance(t, Packed) for t in weights.values())
        self._attention_blas = threads.numpy_blas_on_one_thread if packed else contextlib.nullcontext
        self.tokenizer = tokenizer
        self.path = path
        self.act = ACTIVATIONS[config.activation]
        wte = weights["wte"]
        if config.tied_head:   # x @ wte.T: the table transposed once, here (see _tied_head)
            self.head_w = _tied_head(wte)
        else:
            self.head_w = weights["lm_head.weight"]
        self.head_b = weights.get("lm_head.bias")
        if config.rotary_dim:
            self.cos, self.sin = rotary_tables(config.n_ctx, config.rotary_dim)

    # -- the forward pass -------------------------------------------------------------------

    def forward(self, ids, cache: KVCache | None = None, mask=None, last_only: bool = False) -> np.ndarray:
        """ids [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only).

        With a cache, the T tokens follow what it holds and their keys and values are kept;
        without one, ids is a whole fresh sequence. mask [B, T] marks real tokens (False: left
        padding, never attended to); its default is all real.
        """
        c = self.config
        ids = np.asarray(ids)
        B, T = ids.shape
        check_ids(ids, c.n_vocab)
        threads.apply()
        mask = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
        if cache is None:
            pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            valid, t0 = mask, 0
        else:
            pos = cache.append(mask)
            valid, t0 = cache.valid[:, :cache.length + T], cache.length
        if pos.max(initial=0) >= c.n_ctx:
            raise GptcpuError(f"position {pos.max()} is past the context of {c.n_ctx} tokens")
        bias = self._attention_bias(valid, t0, T)

        x = self._embed(ids, pos)                               # [B, T, C]
        x = x.reshape(B * T, c.n_embd)                         # the blocks work on rows
        rot = self._rotation(pos)
        with self._attention_blas():
            for i in range(c.n_layer):
                x = self.block(i, x, lambda i, q, k, v: self.attend(i, q, k, v, cache, bias, rot, B))
        if cache is not None:
            cache.advance(T)
        x = x.reshape(B, T, c.n_embd)
        if last_only:
            x = x[:, -1:]
        return self.head(x.reshape(-1, c.n_embd)).reshape(B, x.shape[1], -1)   # [B, T, V]

    def forward_ragged(self, pool: SlotCache, parts) -> list[np.ndarray]:
        """Several sequences in one pass, each in its own slot of pool: parts is a list of
        (slot, ids [T_i], all_logits) -> logits per part, [T_i, V] or [1, V] (last only).

        The parts that feed one token go through each weight matrix together (the compiled GEMV,
        the weights read once for up to 8 of them) and attend in one compiled call over their
        slots; each prompt chunk has its own GEMMs and attends over its own slot. This is the
        step of continuous batching (gptcpu.engine.batch): members decoding and members
        prefilling a chunk share it, and no part's numbers depend on the others'. A step
        where every part feeds one token (up to 8) runs `_decode_step`, the same numbers.
        """
        c = self.config
        threads.apply()
        if len(parts) <= Packed.MATVEC_ROWS and all(len(t) == 1 for _, t, _ in parts) and self._decode_args():
            return self._decode_step(pool, parts)   # every part one token: the common step
        ids = np.concatenate([np.asarray(t, np.int64).reshape(-1) for _, t, _ in parts])
        check_ids(ids, c.n_vocab)
        spans, start = [], 0     # per part: its rows a:b of the N tokens, slot, first position
        for slot, t, _ in parts:
            spans.append((start, start + len(t), slot, self._fits(pool, slot, len(t))))
            start += len(t)
        pos = np.concatenate([np.arange(t0, t0 + b - a) for a, b, _, t0 in spans])
        rot = self._rotation(pos[None])
        x = self._embed(ids, pos)                               # [N, C]
        # Rows go through the weights in groups that do not depend on the rest of the batch:
        # one-token rows together, in the compiled GEMV (8 at a time), each prompt chunk on its
        # own. The GEMV computes each row the same way whatever else is in it; BLAS's sgemm
        # does not (one more row changes the others' last bits), so a prompt chunk shares its
        # GEMM with nothing and a sequence's numbers are the same alone or in any batch.
        groups = _row_groups([b - a for a, b, _, _ in spans])
        lin = linear if len(groups) == 1 else (lambda x, w, b=None: _grouped(lambda r: linear(r, w, b), x, groups))
        # what attention needs, the same for every layer: the one-token rows (their rows, slots
        # and lengths after this token) and each prompt chunk with its causal mask
        dec = [(a, slot, t0 + 1) for a, b, slot, t0 in spans if b - a == 1]
        decoding = None
        if dec:
            rows, slots, ends = (np.array(col, np.int64) for col in zip(*dec))
            decoding = (rows if len(dec) < len(ids) else slice(None), slots, ends)
        chunks = [(a, b, slot, t0, self._attention_bias(np.ones((1, t0 + b - a), bool), t0, b - a))
                  for a, b, slot, t0 in spans if b - a > 1]
        with self._attention_blas() if chunks else contextlib.nullcontext():   # (decode uses no BLAS)
            for i in range(c.n_layer):
                x = self.block(i, x, lambda i, q, k, v: self._attend_slots(i, q, k, v, rot, pool, decoding, chunks), lin)
        picked = [np.arange(a, b) if all_logits else np.array([b - 1])
                  for (a, b, _, _), (_, _, all_logits) in zip(spans, parts)]
        for a, b, slot, _ in spans:
            pool.length[slot] += b - a
        sizes = [len(r) for r in picked]
        if sum(sizes) < len(x):   # (decode steps keep every row: one each)
            x = x[np.concatenate(picked)]
        groups = _row_groups([n if all_logits else 1 for n, (_, _, all_logits) in zip(sizes, parts)])
        logits = self.head(x) if len(groups) == 1 else _grouped(self.head, x, groups)   # [sum of picked, V]
        ends = list(itertools.accumulate(sizes))
        return [logits[a:b] for a, b in zip([0] + ends[:-1], ends)]

    def _fits(self, pool, slot, n) -> int:
        """-> the length of slot's cache, where n more tokens fit it; else a GptcpuError."""
        t0, most = int(pool.length[slot]), min(pool.capacity, self.config.n_ctx)
        if t0 + n > most:
            raise GptcpuError(f"{n} more tokens do not fit a cache holding {t0} of {most}")
        return t0

    def _attend_slots(self, i, q, k, v, rot, pool, decoding, chunks):  # q, k, v [N, C] -> [N, C]
        c = self.config
        N, H, D = len(q), c.n_head, c.head_dim
        q, k, v = q.reshape(N, H, D), k.reshape(N, H, D), v.reshape(N, H, D)
        if rot is not None:
            rotate_(q[None], *rot)
            rotate_(k[None], *rot)
        K, V = pool.k[i], pool.v[i]                            # [slots, H, capacity, D]
        scale = self.attn_scale[i]
        out = np.empty((N, H, D), F32)
        if decoding:  # one token each: one compiled call writes their keys and values and attends
            rows, slots, ends = decoding
            o = out if not chunks else np.empty((len(slots), H, D), F32)   # (no chunks: every row)
            kernels.attend_decode(np.ascontiguousarray(q[rows]), np.ascontiguousarray(k[rows]),
                                  np.ascontiguousarray(v[rows]), K, V, slots, ends, scale, o)
            if chunks:
                out[rows] = o
        out = out.reshape(N, H * D)
        for a, b, slot, t0, bias in chunks:  # a prompt chunk, causal over its own slot
            kernels.store_kv(K[slot], t0, np.ascontiguousarray(k[a:b]))
            kernels.store_kv(V[slot], t0, np.ascontiguousarray(v[a:b]))
            S = t0 + b - a
            qa = q[a:b].transpose(1, 0, 2)[None]                # [1, H, T, D]
            out[a:b] = attention(qa, _f32(K[slot], S), _f32(V[slot], S), bias, scale)[0]
        return out

    _decode = None   # _decode_args, once bound

    def _decode_args(self) -> tuple | None:
        """What kernels.decode_gpt2 and decode_gptj take for the layers, bound once: the table of
        each block's tensors (layer norms' weight and bias, each weight matrix as bits, q8 scale
        or kernels.NONE, bias, in its order; kernels.layer_table), an empty array of the
        matrices' dtype (4-d where q8 matrices are stored as pairs), each layer's attention
        scale, the table of the final layer norm and the LM head (empty where the head's matrix
        differs from the blocks' in dtype or layout: `head` then runs it), and the tensors
        (which the tables point into). None where a matrix is neither
        Packed nor C-contiguous float32, a tensor is not C-contiguous, the matrices differ in
        dtype or layout, or the activation has no compiled form:
        decode then goes through `block`, as prefill does."""
        if self._decode is None:
            names = ("ln_1", "w_in", "w_out") if self.config.parallel_residual else \
                    ("ln_1", "attn.w_qkv", "attn.w_o", "ln_2", "mlp.w_in", "mlp.w_out")
            args = [[_decode_arg(layer, n) for n in names] for layer in self.layers]
            ok = self.config.activation in kernels.DECODE_ACTIVATIONS and all(a is not None for b in args for a in b)
            blocks = [tuple(t for a in block for t in a) for block in args] if ok else []
            kinds = {(t.dtype, t.ndim) for block in blocks for t in block if t.ndim >= 2}
            contiguous = all(t.flags.c_contiguous for block in blocks for t in block)
            if len(kinds) == 1 and contiguous:
                dtype, ndim = kinds.pop()   # like: an empty array of the matrices' dtype, 4-d for q8 pairs
                like = np.empty((4, 0, 0, 2) if ndim == 4 else 0, dtype)
                w, b = self.head_w, self.head_b
                bits, scale = (w.bits, w.scale) if isinstance(w, Packed) else (w, None)
                head = [(self.w["ln_f.weight"], self.w["ln_f.bias"], bits, kernels.NONE if scale is None else scale,
                         kernels.NONE if b is None else b)]
                if (bits.dtype, bits.ndim) != (dtype, ndim) or not all(t.flags.c_contiguous for t in head[0]):
                    head = []
                self._decode = (kernels.layer_table(blocks), like, np.array(self.attn_scale, F32),
                                kernels.layer_table(head) if head else np.zeros((0, 5, 3), np.int64), blocks + head)
            else:
                self._decode = ()
        return self._decode or None

    def _decode_step(self, pool, parts) -> list[np.ndarray]:
        """forward_ragged where every part feeds one token, at most Packed.MATVEC_ROWS of them
        (generation's decode step, batched or not): every layer in one compiled call
        (kernels.decode_gpt2, decode_gptj), the same numbers as `block` with `_attend_slots`,
        bit for bit.
        GPT-2-small q8, 2 threads, one process alternating with 64 MB read between steps:
        3.91 -> 3.76 ms a step with `block`'s glue cut to ~12 Python operations a block (+5-6%
        decode tok/s interleaved with the f32, bf16 and f16 models, run_one's rounds), then
        4.00-4.24 -> 3.82-4.11 ms with each block compiled, against that. With every layer in
        one call (a 768 MB read between steps): 9.60 -> 9.13 and 8.65 -> 8.37 ms a step (1.03-
        1.05x, the same greedy tokens), batch 4 1.05x (median of three runs, 0.90-1.16x); GPT-J
        width with 4 layers 1.00x. The final layer norm and the LM head run in that call too,
        and the checks before it take Python's ints, not NumPy's calls: ~0.2 ms of Python a
        step cold, where the weights streaming through have pushed it out of the caches."""
        c = self.config
        ids = [int(t[0]) for _, t, _ in parts]
        if not all(0 <= i < c.n_vocab for i in ids):
            check_ids(ids, c.n_vocab)   # (raises)
        slots = np.array([slot for slot, _, _ in parts], np.int64)
        pos = np.array([self._fits(pool, slot, 1) for slot in slots], np.int64)
        x = np.ascontiguousarray(self._embed(np.array(ids, np.int64), pos), dtype=F32)   # [N, C]
        ends = pos + 1
        N, C, H, D = len(x), c.n_embd, c.n_head, c.head_dim
        eps, T, act = F32(c.layer_norm_epsilon), threads.kernel_threads(), kernels.DECODE_ACTIVATIONS[c.activation]
        y, h, a, q, k, v = (np.empty(shape, F32) for shape in [(N, C)] * 2 + [(N, H, D)] * 4)
        table, like, scales, head, _ = self._decode_args()
        u = np.empty((N, table[0, 2, 2]), F32)   # a block's first matrix's columns: w_qkv, or GPT-J's w_in
        logits = np.empty((N, head[0, 2, 2] if len(head) else 0), F32)
        if c.parallel_residual:   # GPT-J
            cat = np.empty((N, C + u.shape[1] - 3 * C), F32)
            cos, sin = (self.cos, self.sin) if c.rotary_dim else (np.empty((c.n_ctx, 0), F32),) * 2
            kernels.decode_gptj(x, y, h, u, cat, a, q, k, v, eps, T, act, pool.k, pool.v, slots, ends, scales,
                                cos, sin, table, like, head, logits)
        else:
            r, mlp = np.empty((N, C), F32), np.empty((N, c.n_inner), F32)
            kernels.decode_gpt2(x, y, h, u, r, mlp, a, q, k, v, eps, T, act, pool.k, pool.v, slots, ends, scales,
                                table, like, head, logits)
        pool.length[slots] += 1
        if not len(head):   # (the head not in that call)
            logits = self.head(y if c.n_layer % 2 else x)   # (each layer writes the other buffer)
        return [logits[j:j + 1, :c.n_vocab] for j in range(N)]

    def _embed(self, ids, pos):  # token ids and their positions [...] -> [..., C], a fresh array
        x = embed(self.w["wte"], ids)
        if self.config.arch == "gpt2":
            x += embed(self.w["wpe"], pos)
        return x

    def _rotation(self, pos):  # position ids [B, T] -> cos, sin [B, T, 1, R/2], or None (GPT-2)
        if not self.config.rotary_dim:
            return None
        return self.cos[pos][:, :, None], self.sin[pos][:, :, None]

    def head(self, x):  # final layer norm and LM head: [N, C] -> [N, V]
        c = self.config
        x = layer_norm(x, self.w["ln_f.weight"], self.w["ln_f.bias"], c.layer_norm_epsilon)
        return linear(x, self.head_w, self.head_b)[:, :c.n_vocab]   # (a tied head's columns are padded)

    @staticmethod
    def _attention_bias(valid, t0, T):  # valid [B, S] -> [B, 1, T, S] of 0 / MASKED, or None
        B, S = valid.shape
        causal = np.arange(S)[None, :] <= (t0 + np.arange(T))[:, None]  # [T, S]
        allowed = causal[None] & valid[:, None, :]                       # [B, T, S]
        if allowed.all():
            return None
        return np.where(allowed, F32(0), MASKED)[:, None].astype(F32)

    def block(self, i, x, attend, linear=linear):  # [N, C] -> [N, C]; attend(i, q, k, v) -> [N, C]
        # (rows [N, C], not [B, T, C], and the residual added into the fresh output, y += x: the same
        # sums as x + y with fewer NumPy calls; at GPT-2-small's decode each costs ~0.3-1 us,
        # 12 layers a token)
        c, w = self.config, self.layers[i]
        C = c.n_embd
        h = layer_norm(x, w["ln_1.weight"], w["ln_1.bias"], c.layer_norm_epsilon)
        if c.parallel_residual:
            # GPT-J: attention and MLP both read h; one GEMM in, one GEMM out
            u = linear(h, w["w_in"], w["b_in"])                 # [N, 3C + I]
            a = attend(i, u[:, :C], u[:, C:2 * C], u[:, 2 * C:3 * C])
            g = self.act(u[:, 3 * C:])                          # [N, I]
            y = linear(np.concatenate([a, g], -1), w["w_out"], w["b_out"])
            y += x
            return y
        qkv = linear(h, w["attn.w_qkv"], w["attn.b_qkv"])      # [N, 3C]
        a = attend(i, qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:])
        r = linear(a, w["attn.w_o"], w["attn.b_o"])           # the residual stream after attention
        r += x
        h = layer_norm(r, w["ln_2.weight"], w["ln_2.bias"], c.layer_norm_epsilon)
        y = linear(self.act(linear(h, w["mlp.w_in"], w["mlp.b_in"])), w["mlp.w_out"], w["mlp.b_out"])
        y += r
        return y

    def attend(self, i, q, k, v, cache, bias, rot, B):  # q, k, v [B * T, C] -> [B * T, C]
        c = self.config
        T, C = len(q) // B, q.shape[1]
        H, D = c.n_head, c.head_dim
        q, k, v = (t.reshape(B, T, H, D) for t in (q, k, v))
        if rot is not None:
            rotate_(q, *rot)
            rotate_(k, *rot)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H, T, D]
        if cache is not None:
            k, v = cache.update(i, k, v)                        # [B, H, S, D]
        return attention(q, k, v, bias, self.attn_scale[i]).reshape(B * T, C)

    # -- the public API ---------------------------------------------------------------------

    def logits(self, ids) -> np.ndarray:
        """Logits [len(ids), V] float32 for every position of a fresh sequence (no cache kept)."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        if ids.shape[1] > self.config.n_ctx:
            raise GptcpuError(f"{ids.shape[1]} tokens do not fit the context of {self.config.n_ctx}")
        return self.forward(ids)[0]

    def new_cache(self, batch: int = 1, capacity: int | None = None) -> KVCache:
        return KVCache(self.config, batch, min(capacity or self.config.n_ctx, self.config.n_ctx))

    def generate(self, ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed=None, stop=None, repetition_penalty: float = 1.0,
                 truncate: str | None = None):
        """Yield new token ids one at a time as they are sampled (see gptcpu.engine.generate)."""
        from .generate import generate
        return generate(self, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop=stop, repetition_penalty=repetition_penalty, truncate=truncate)

    def generate_batch(self, prompts, max_new_tokens: int = 64, **sampling) -> list[list[int]]:
        """Several prompts at once (one continuous batch), each stopping on its own -> new ids per prompt."""
        from .generate import generate_batch
        return generate_batch(self, prompts, max_new_tokens, **sampling)


def _tied_head(wte):
    """The embedding table [V, C] as the LM head's [C, V'] matrix, [in, out] as every other
    (V' = V rounded up to 64, the columns past V zero, so that each row starts on a cache line
    and q8 takes the int16-pair GEMV). Decode streams it as it streams the blocks' matrices:
    the dot products along wte's rows (matvec_t) read memory slower (GPT-2 small's head alone
    from memory, 2 threads, Xeon: q8 1.94 -> 1.66 ms, bf16 3.81 -> 2.24, f16 2.99 -> 2.15,
    f32 6.44 -> 4.46); decode, in one process alternating with the matvec_t head, 1.04x at q8,
    1.06x bf16 and f16, 1.10x f32, the same greedy tokens. The one copy load makes: the
    table's own pages leave RSS as they are copied (weights.transposed), and the embedding
    gather faults back only the rows it reads. Load takes 0.1-0.3 s longer for GPT-2 small.
    A q8 head is stored as pairs (Packed.as_pairs) where the CPU multiplies int16 pairs, copied
    straight into them where C is a multiple of 8."""
    table = wte.bits if isinstance(wte, Packed) else wte
    width = -(-table.shape[0] // 64) * 64
    if not isinstance(wte, Packed):
        return transposed(table, width)
    scale = None if wte.scale is None else np.pad(wte.scale, (0, width - len(wte.scale)))
    C = table.shape[1]
    if wte.dtype == "q8" and kernels.PAIRS and C % 8 == 0:   # as pairs (Packed.pairable), in one copy:
        # the head's pairs of rows are wte's pairs of columns, its int16 view's transpose
        out = np.zeros((4, C // 8, width), np.int16)   # (pair row h: stripe h % 4, its row h // 4)
        transposed(table.view(np.int16), width, out=out.transpose(1, 0, 2))
        return Packed(out.view(np.int8).reshape(4, C // 8, width, 2), "q8", scale, C)
    head = Packed(transposed(table, width), wte.dtype, scale)
    return head.as_pairs() if head.pairable else head


def load_weights(path: Path, config: Config) -> dict[str, np.ndarray | Packed]:
    """The model's tensors as zero-copy mmap views: f32 arrays, or Packed low-precision matrices."""
    from gptcpu.convert.maps import ARCHS  # the format's names and shapes are defined once, there

    file = path / "model.safetensors"
    if not file.exists():
        raise GptcpuError(f"{path} has no model.safetensors")
    tensors = mmap_tensors(file)
    outputs = ARCHS[config.arch].outputs(config)
    weights = {}
    for o in outputs:
        t = tensors.get(o.name)
        if t is None:
            raise GptcpuError(f"{file} lacks tensor {o.name}")
        if t.shape != o.shape:
            raise GptcpuError(f"{file}: tensor {o.name} has shape {list(t.shape)}, expected {list(o.shape)}")
        want = {"f32": F32, "f16": np.float16, "bf16": np.uint16, "q8": np.int8}[config.dtype] if o.is_weight else F32
        if t.dtype != want:
            raise GptcpuError(f"{file}: tensor {o.name} is {t.dtype}, expected {np.dtype(want)} ({config.dtype})")
        if o.is_weight and config.dtype != "f32":
            scale = tensors.get(o.name + ".scale") if config.dtype == "q8" else None
            if config.dtype == "q8" and (scale is None or scale.shape != (o.channels,)):
                raise GptcpuError(f"{file} lacks the {o.channels} scales of {o.name}")
            t = Packed(t, config.dtype, scale)
        weights[o.name] = t
    return _as_pairs(weights)


def _as_pairs(weights: dict) -> dict:
    """q8 weights: the blocks' matrices stored as pairs (Packed.as_pairs: a copy, each matrix's
    mapped pages released as it is made) where every one of them is `pairable` (the decode step
    takes one layout for all), and an untied LM head where it is; the embedding tables stay."""
    blocks = [n for n, t in weights.items() if isinstance(t, Packed) and n.startswith("blocks.")]
    names = blocks if all(weights[n].pairable for n in blocks) else []
    head = weights.get("lm_head.weight")
    if isinstance(head, Packed) and head.pairable:
        names.append("lm_head.weight")
    if not names:
        return weights
    # one allocation for them all, each matrix from a cache line: NumPy asks for transparent huge
    # pages above 4 MB, where each matrix on its own (GPT-2 small's 0.6-2.4 MB) gets 4 KB pages
    # (its 48 GEMVs from memory, 2 threads, Xeon: 4.48 ms on 4 KB pages, 4.34 on huge ones)
    shapes = [pairs_shape(weights[n].shape) for n in names]
    sizes = [-(-math.prod(s) // 64) * 64 for s in shapes]
    arena, out = np.zeros(sum(sizes) + 64, np.int8), {}
    start = -arena.ctypes.data % 64
    for n, shape, size in zip(names, shapes, sizes):
        out[n] = weights[n].as_pairs(arena[start:start + math.prod(shape)].reshape(shape))
        start += size
    return {**weights, **out}


def load(path, threads: int | None = None, backend: str | None = None, threading: str | None = None,
         kv_cache: str | None = None) -> Model:
    """Load a gptcpu model folder (written by `gptcpu convert`) -> Model.

    backend: "openblas" (NumPy's own) or "mkl" (default: $GPTCPU_BACKEND, else MKL on an Intel
    CPU where the mkl extra is installed, else OpenBLAS); threading: "openmp", "tbb" or
    "sequential" (see gptcpu.engine.blas; both once per process). threads sets every pool at
    once; the default is the CPUs this process may use (its affinity, capped by a container's
    CPU quota).
    kv_cache: "f32" or "f16", the KV cache of generate, generate_batch and the server (default:
    f32 for f32 weights, f16 for the others). The first load also raises glibc's malloc
    thresholds for the process, unless the environment sets them (engine.heap)."""
    from .config import Config
    from .heap import keep_temporaries
    from .threads import available_cpus, set_threads
    from .tokenizer import Tokenizer

    blas.use(backend, threading)
    keep_temporaries()
    path = Path(path)
    if not path.is_dir():
        raise GptcpuError(f"{path} is not a model folder")
    set_threads(threads or available_cpus())
    config = Config.load(path)
    tokenizer = Tokenizer.from_folder(path) if (path / "tokenizer.json").exists() else None
    return Model(config, load_weights(path, config), tokenizer, path, kv_cache)
