"""The NumPy engine against the reference, transformers on torch CPU."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

import gptcpu
from conftest import SHAPES
from gptcpu.engine import blas, kernels
from gptcpu.engine.errors import GptcpuError
from test_convert import assert_one_line_error, run_cli

ALL = list(SHAPES)


def prompt(model, n=12, seed=0):
    return np.random.default_rng(seed).integers(0, min(model.config.n_vocab, 50257), n).tolist()


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(hf, ids, n, **kw):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("shape", ALL)
def test_logits_match_transformers(factory, shape):
    m = gptcpu.load(factory.converted(shape))
    ids = prompt(m, 20)
    got, want = m.logits(ids), hf_logits(factory.hf_model(shape), ids)
    assert got.dtype == np.float32 and got.shape == (20, m.config.n_vocab)
    print(f"{shape}: max |logits - HF| = {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", ALL)
def test_greedy_tokens_match_transformers_generate(factory, shape):
    m = gptcpu.load(factory.converted(shape))
    ids = prompt(m, 8, seed=1)
    got = list(m.generate(ids, 30))
    assert got == hf_greedy(factory.hf_model(shape), ids, 30)


def test_repetition_penalty_matches_transformers(factory):
    m = gptcpu.load(factory.converted("gptj"))
    ids = prompt(m, 6, seed=2)
    got = list(m.generate(ids, 20, repetition_penalty=1.5))
    assert got == hf_greedy(factory.hf_model("gptj"), ids, 20, repetition_penalty=1.5)


@pytest.mark.parametrize("shape", ["gpt2", "gptj-odd"])
def test_cached_decode_equals_uncached_forward(factory, shape):
    m = gptcpu.load(factory.converted(shape))
    ids = prompt(m, 10, seed=3)
    full = list(m.generate(ids, 15))
    cache = m.new_cache()
    step_logits = [m.forward(np.array([ids]), cache)[0]]            # prefill: all prompt positions
    for t in full[:-1]:
        step_logits.append(m.forward(np.array([[t]]), cache)[0])    # decode: one position each
    cached = np.concatenate(step_logits)
    uncached = m.logits(ids + full[:-1])
    np.testing.assert_allclose(cached, uncached, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", ["gpt2", "gptj"])
def test_batch_with_padding_equals_each_prompt_alone(factory, shape):
    m = gptcpu.load(factory.converted(shape))
    prompts = [prompt(m, n, seed=n) for n in (3, 11, 7)]
    batch = m.generate_batch(prompts, 12)
    alone = [list(m.generate(p, 12)) for p in prompts]
    assert batch == alone
    # and the logits: a padded row's last position equals its unpadded forward
    ids = np.zeros((2, 11), np.int64)
    mask = np.zeros((2, 11), bool)
    ids[0, 8:], mask[0, 8:] = prompts[0], True
    ids[1], mask[1] = prompts[1], True
    padded = m.forward(ids, m.new_cache(2), mask, last_only=True)[:, -1]
    np.testing.assert_allclose(padded[0], m.logits(prompts[0])[-1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(padded[1], m.logits(prompts[1])[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", ["gpt2", "gptj"])
def test_prompt_attention_in_query_blocks(factory, shape, monkeypatch):
    """Prompts longer than a query block (made 3 rows here): logits against the reference, a
    prompt fed in two chunks to a cache, and a left-padded batch row, as one block would give."""
    from gptcpu.engine import model as engine_model

    monkeypatch.setattr(engine_model, "QUERY_BLOCK", 3)
    m = gptcpu.load(factory.converted(shape))
    ids = prompt(m, 20, seed=5)
    np.testing.assert_allclose(m.logits(ids), hf_logits(factory.hf_model(shape), ids), atol=1e-4, rtol=0)
    cache = m.new_cache()
    chunked = np.concatenate([m.forward(np.array([ids[:7]]), cache)[0], m.forward(np.array([ids[7:]]), cache)[0]])
    np.testing.assert_allclose(chunked, m.logits(ids), atol=1e-5, rtol=0)
    short = ids[:8]
    batch_ids, mask = np.zeros((2, 20), np.int64), np.zeros((2, 20), bool)
    batch_ids[0, 12:], mask[0, 12:] = short, True
    batch_ids[1], mask[1] = ids, True
    padded = m.forward(batch_ids, m.new_cache(2), mask)
    np.testing.assert_allclose(padded[0, 12:], m.logits(short), atol=1e-5, rtol=0)
    np.testing.assert_allclose(padded[1], m.logits(ids), atol=1e-5, rtol=0)


def test_batch_rows_stop_on_their_own_and_sample_as_alone(factory):
    m = gptcpu.load(factory.converted("gpt2"))
    prompts = [prompt(m, n, seed=10 + n) for n in (4, 9)]
    sampling = dict(temperature=0.9, top_k=50, seed=7)
    alone = [list(m.generate(p, 10, **sampling)) for p in prompts]
    stop = m.tokenizer.decode(alone[0][2:4])  # row 0 stops early on a stop string
    batch = m.generate_batch(prompts, 10, stop=[stop], **sampling)
    assert batch[0] == list(m.generate(prompts[0], 10, stop=[stop], **sampling)) and len(batch[0]) <= 4
    assert batch[1][:len(batch[1])] == alone[1][:len(batch[1])]


def test_seeded_sampling_is_reproducible(factory):
    m = gptcpu.load(factory.converted("gptj"))
    ids = prompt(m, 5)
    a = list(m.generate(ids, 20, temperature=1.0, seed=123))
    b = list(m.generate(ids, 20, temperature=1.0, seed=123))
    c = list(m.generate(ids, 20, temperature=1.0, seed=124))
    assert a == b and a != c
    assert list(m.generate(ids, 20, temperature=1.0, top_k=1, seed=5)) == list(m.generate(ids, 20))


@pytest.mark.parametrize("V", [1, 5, 1024, 1500, 50257])
def test_draw_samples_each_index_with_its_probability(V):
    """Inverse-CDF sampling over blocks: every u picks the index whose share of the running sum
    holds it (checked against float64), and frequencies follow the weights."""
    from gptcpu.engine.sampling import draw

    rng = np.random.default_rng(V)
    w = np.exp(rng.standard_normal(V) * 3).astype(np.float32)
    w[rng.random(V) < 0.3] = 0    # tokens a logit bias ruled out are never drawn
    w[-1] = 1
    cdf = np.cumsum(w.astype(np.float64))
    for u in rng.random(2000, dtype=np.float32):
        j = draw(w, u)
        lo, hi = (cdf[j - 1] if j else 0) / cdf[-1], cdf[j] / cdf[-1]
        assert w[j] > 0 and lo - 1e-5 <= u <= hi + 1e-5
    assert draw(w, np.float32(0)) == np.flatnonzero(w)[0]
    if V >= 1024:
        n = 100_000
        counts = np.bincount([draw(w, u) for u in rng.random(n, dtype=np.float32)], minlength=V)
        p = w / w.sum()
        assert np.abs(counts / n - p).max() < 5 * np.sqrt(p.max() / n)


def q8_round_trip(state: dict) -> dict:
    """What gptcpu's q8 keeps of HF weights: symmetric int8, one scale per output channel (rows
    of Linear weights and embedding tables; columns of GPT-2's Conv1D [in, out]). GPT-J's fused
    output GEMM [Wo ; W_out] shares one scale per output channel between its two halves."""
    def absmax(name, w):
        conv1d = any(k in name for k in ("c_attn", "c_proj", "c_fc"))
        m = w.abs().amax(dim=0 if conv1d else 1, keepdim=True)
        if name.endswith("attn.out_proj.weight") or name.endswith("mlp.fc_out.weight"):
            layer = name.rsplit(".", 3)[0]  # transformer.h.{i}
            m = torch.maximum(state[layer + ".attn.out_proj.weight"].abs().amax(1, keepdim=True),
                              state[layer + ".mlp.fc_out.weight"].abs().amax(1, keepdim=True))
        return m

    out = {}
    for name, w in state.items():
        if w.ndim == 2:
            m = absmax(name, w)
            scale = torch.where(m > 0, m / 127, torch.ones_like(m))
            w = torch.clamp(torch.round(w / scale), -127, 127) * scale
        out[name] = w
    return out


@pytest.mark.parametrize("dtype,tol", [("f16", 2e-3), ("bf16", 2e-2), ("q8", 6e-2)])
@pytest.mark.parametrize("shape", ["gpt2", "gptj"])
def test_low_precision_models(factory, shape, dtype, tol):
    """Exact (1e-4) against HF run on the same rounded weights (q8: 5e-4 of the largest logit,
    where its prefill rounds x to int16; bf16 on MKL's bf16 GEMM: HF with its matmuls' inputs
    rounded to bf16 too, most rows to 1e-4); within tol * max|logit| of f32.

    The tolerance: f16 keeps 11 significant bits (relative rounding <= 2^-11 = 4.9e-4), bf16 8
    (<= 2^-8 = 3.9e-3) and q8 rounds to within half a step of 1/127 of a channel's largest
    weight; each logit sums ~n_embd rounded products whose errors partly cancel, through a few
    layers, so we allow about 4-5x one weight's relative error of the logits' scale. Measured:
    f16 4.6e-4-8.7e-4, bf16 3.6e-3-5.9e-3 (4.6e-3-8.4e-3 with its prefill on MKL's bf16
    GEMM, x rounded to bf16 too), q8 1.3e-2-3.1e-2.
    """
    m = gptcpu.load(factory.converted(shape, dtype))
    ids = prompt(m, 16)
    got = m.logits(ids)
    hf = factory.hf_model(shape)
    state = hf.state_dict()
    if dtype == "q8":
        state = q8_round_trip(state)
    else:
        torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
        state = {k: v.to(torch_dtype).float() if v.ndim == 2 else v for k, v in state.items()}
    rounded = type(hf)(hf.config).eval()
    rounded.load_state_dict(state)
    # bf16 prefill on MKL's bf16 GEMM (a CPU with AMX) rounds each matmul's x to bf16, as
    # torch's bf16 models do: the reference rounds its Linear/Conv1D inputs the same way
    amx = dtype == "bf16" and getattr(blas.active(), "amx_bf16", False)
    hooks = [mod.register_forward_pre_hook(lambda mod, args: (args[0].to(torch.bfloat16).float(),))
             for mod in rounded.modules() if amx and isinstance(mod, (torch.nn.Linear, Conv1D))]
    same = hf_logits(rounded, ids)
    assert len(hooks) == (4 if shape == "gpt2" else 6) * m.config.n_layer + 1 if amx else not hooks
    # q8's prefill GEMM rounds x to int16 (kernels._gemm_pairs); measured 0.8-1.3e-4 of the
    # largest logit here, against q8's own 1.3-3.1e-2 from its weights
    exact = 5e-4 * np.abs(same).max() if dtype == "q8" and kernels.PAIRS else 1e-4
    if amx:   # a rounding that f32 summation order puts on the other side of a bf16 half-step
        rows = np.abs(got - same).max(axis=1)   # moves that row, and the rows after it, a little
        assert (rows < exact).mean() >= 0.75 and rows.max() < 1e-2 * np.abs(same).max(), rows
    else:
        np.testing.assert_allclose(got, same, atol=exact, rtol=0)
    want = hf_logits(hf, ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{shape} {dtype}: max |logits - f32 logits| / max |logit| = {err:.2e}")
    assert err < tol
    # the compiled decode kernels (f32 x) agree with the prefill path (the compiled GEMM; with
    # x rounded to bf16 on MKL's bf16 GEMM, measured 2.8e-3-4.4e-3 of the largest logit apart)
    cache = m.new_cache()
    steps = [m.forward(np.array([ids[:4]]), cache)[0]] + [m.forward(np.array([[t]]), cache)[0] for t in ids[4:]]
    steps = np.concatenate(steps)
    if amx:
        assert np.abs(steps - got).max() < 1e-2 * np.abs(got).max()
    else:
        np.testing.assert_allclose(steps, got, atol=exact if dtype == "q8" else 1e-5, rtol=0)


def mapped(a: np.ndarray) -> bool:   # a view of a file's read-only mmap, as load makes them
    from gptcpu.engine.weights import _mapping

    return _mapping(a) is not None


@pytest.mark.parametrize("dtype", ["f32", "bf16", "q8"])
def test_weights_stay_memory_mapped(factory, dtype):
    """No copy at load: f32 arrays and low-precision bits are views of the file's mmap (but q8
    matrices stored as pairs: test_q8_matrices_stored_as_pairs)."""
    from gptcpu.engine.weights import Packed

    m = gptcpu.load(factory.converted("gptj", dtype))
    for name, w in m.w.items():
        if isinstance(w, Packed):
            assert w.dtype == dtype and (w.scale is None or mapped(w.scale)), name
            assert mapped(w.bits) or w.bits.ndim == 4, name
        else:
            assert w.dtype == np.float32 and mapped(w), name


@pytest.mark.skipif(not kernels.PAIRS, reason="this CPU has no int16 pair multiply (AVX2 or AVX-512BW)")
def test_q8_matrices_become_pairs_all_or_none():
    """model._as_pairs: the blocks' q8 matrices as pairs where every one is pairable (N a
    multiple of the lanes), else none of them; an untied LM head on its own; tables never."""
    from gptcpu.engine.model import _as_pairs
    from gptcpu.engine.weights import Packed

    rng = np.random.default_rng(0)
    q8 = lambda k, n: Packed(rng.integers(-127, 128, (k, n)).astype(np.int8), "q8", np.ones(n, np.float32))  # noqa: E731
    lanes = kernels.LANES
    for odd in (False, True):
        w = {"wte": q8(50, 2 * lanes), "blocks.0.attn.w_qkv": q8(2 * lanes, 6 * lanes),
             "blocks.0.mlp.w_out": q8(37, 2 * lanes + odd), "lm_head.weight": q8(2 * lanes, 48 * lanes)}
        out = _as_pairs(w)
        assert [out[n].bits.ndim for n in w] == [2, 2 if odd else 4, 2 if odd else 4, 4]
        for n in w:
            assert out[n].shape == w[n].shape and out[n].scale is w[n].scale
        x = rng.standard_normal((3, 37)).astype(np.float32)
        np.testing.assert_allclose(x @ out["blocks.0.mlp.w_out"], x @ w["blocks.0.mlp.w_out"], rtol=0,
                                   atol=1e-4 * np.abs(x @ w["blocks.0.mlp.w_out"]).max())


@pytest.mark.skipif(not kernels.PAIRS, reason="this CPU has no int16 pair multiply (AVX2 or AVX-512BW)")
@pytest.mark.parametrize("shape", ["gpt2-wide", "gptj"])
def test_q8_matrices_stored_as_pairs(factory, shape, monkeypatch):
    """Load copies q8's block matrices into pairs (weights.pairs, model._as_pairs), and an
    untied head; the tables stay mapped. Against the same model on [K, N]: prefill's logits the
    same bits; decode's the same where the GEMV on [K, N] runs on int16 pairs too (GPT-2
    small's width), else within x's rounding to int16 (the small matrices' column split); the
    greedy tokens the same."""
    from gptcpu.engine.weights import Packed

    m = gptcpu.load(factory.converted(shape, "q8"))
    monkeypatch.setattr(Packed, "pairable", property(lambda self: False))
    rows = gptcpu.load(factory.converted(shape, "q8"))
    blocks = [w for n, w in m.w.items() if n.startswith("blocks.") and isinstance(w, Packed)]
    assert blocks and all(w.bits.ndim == 4 and not mapped(w.bits) for w in blocks)
    assert mapped(m.w["wte"].bits) and all(w.bits.ndim == 2 for w in rows.w.values() if isinstance(w, Packed))
    if "lm_head.weight" in m.w:
        assert m.w["lm_head.weight"].bits.ndim == 4
    ids = prompt(m, 12)
    np.testing.assert_array_equal(m.logits(ids), rows.logits(ids))
    steps = {}
    for k, model in (("pairs", m), ("rows", rows)):
        cache = model.new_cache()
        model.forward(np.array([ids[:4]]), cache)
        steps[k] = np.concatenate([model.forward(np.array([[t]]), cache)[0] for t in ids[4:]])
    if shape == "gpt2-wide":
        np.testing.assert_array_equal(steps["pairs"], steps["rows"])
    else:
        np.testing.assert_allclose(steps["pairs"], steps["rows"], atol=5e-4 * np.abs(steps["rows"]).max(), rtol=0)
    assert list(m.generate(ids, 8)) == list(rows.generate(ids, 8))


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8"])
def test_tied_head_is_the_one_copy_and_the_embedding_transposed(factory, dtype):
    """GPT-2's LM head is wte transposed once at load, [C, V rounded up to 64], the columns past
    V zero (and their q8 scales); everything else stays a view of the file."""
    from gptcpu.engine.weights import Packed

    m = gptcpu.load(factory.converted("gpt2-gelu", dtype))   # vocab 301: 19 columns of padding
    wte = m.w["wte"]
    table = wte.bits if isinstance(wte, Packed) else wte
    head = m.head_w.bits if isinstance(m.head_w, Packed) else m.head_w
    if head.ndim == 4:   # q8 stored as pairs (weights.pairs): back to [C, 320] to compare
        head = head.transpose(1, 0, 3, 2).reshape(-1, head.shape[2])[:wte.shape[1]]
    V, C = table.shape
    assert head.shape == (C, 320) and not mapped(head)
    assert m.head_w.shape == (C, 320) and (m.head_w.bits if isinstance(m.head_w, Packed) else m.head_w).flags.c_contiguous
    assert np.array_equal(head[:, :V], table.T) and not head[:, V:].any()
    if dtype == "q8":
        assert np.array_equal(m.head_w.scale[:V], wte.scale) and not m.head_w.scale[V:].any()
        assert m.head_w.bits.ndim == (4 if kernels.PAIRS else 2)
    assert all(mapped(w.bits if isinstance(w, Packed) else w) or w.bits.ndim == 4 for w in m.w.values())
    assert m.logits([1, 2, 3]).shape == (3, V)


def test_transposing_a_mapped_table_releases_its_pages(tmp_path):
    """weights.transposed drops each block of a mapped table from RSS once copied (the table
    is not held twice); the pages are read back, the same bytes, when touched again."""
    from gptcpu.engine.weights import mmap_tensors, transposed
    from safetensors.numpy import save_file

    def rss_file_kb():
        return int(next(line for line in open("/proc/self/status") if line.startswith("RssFile")).split()[1])

    table = np.random.default_rng(0).integers(-128, 128, (4001, 4096), dtype=np.int8)   # 16 MB
    save_file({"t": table}, tmp_path / "t.safetensors")
    t = mmap_tensors(tmp_path / "t.safetensors")["t"]
    assert int(t.sum(dtype=np.int64)) == int(table.sum(dtype=np.int64))   # every page mapped
    before = rss_file_kb()
    out = transposed(t, 4032)
    assert before - rss_file_kb() > 15_000
    assert out.shape == (4096, 4032) and np.array_equal(out[:, :4001], table.T) and not out[:, 4001:].any()
    assert np.array_equal(t, table)


def test_context_limits(factory):
    m = gptcpu.load(factory.converted("gpt2"))  # n_ctx 64
    with pytest.raises(GptcpuError, match="70 tokens.*holds 64"):
        list(m.generate(prompt(m, 70), 5))
    out = list(m.generate(prompt(m, 70), 5, truncate="left"))   # keeps the last 59, room for 5
    assert len(out) == 5
    assert len(list(m.generate(prompt(m, 60), 50))) == 4        # stops cleanly at the context end
    with pytest.raises(GptcpuError, match="65 tokens"):
        m.logits(prompt(m, 65))


def test_bad_token_ids_are_a_clear_error(factory):
    m = gptcpu.load(factory.converted("gpt2-untied"))  # vocab 1001
    with pytest.raises(GptcpuError, match="1001 is outside the vocabulary of 1001"):
        m.logits([5, 1001])
    with pytest.raises(GptcpuError, match="-1 is outside"):
        list(m.generate([-1, 3], 2))


def test_stop_strings(factory):
    m = gptcpu.load(factory.converted("gpt2"))
    ids = prompt(m, 5)
    free = list(m.generate(ids, 20))
    stop = m.tokenizer.decode(free[5:7])
    stopped = list(m.generate(ids, 20, stop=stop))
    assert stopped == free[:len(stopped)] and len(stopped) <= 7
    assert stop in m.tokenizer.decode(stopped)
    eos = m.config.eos_token_id
    assert eos not in free  # else the test below proves nothing


def test_text_stream_never_splits_characters_and_hides_stop(factory):
    from gptcpu.engine.tokenizer import TextStream

    tok = gptcpu.load(factory.converted("gpt2")).tokenizer
    text = "naïve 日本語 🙂 code: x = 1\nEND of it"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    stream = TextStream(tok, stop=["END"])
    shown = "".join([stream.push(t) for t in ids] + [stream.finish()])
    assert shown == text[:text.index("END")]


def test_generate_cli_streams_the_model_output(factory):
    folder = factory.converted("gpt2")
    m = gptcpu.load(folder)
    text = "Hello world, this is"
    want = m.tokenizer.decode(list(m.generate(m.tokenizer.encode(text), 12)))
    r = run_cli("generate", "--model", folder, "--temperature", "0", "--max-new-tokens", "12",
                "--threads", "1", "--verbose", text)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert "decode" in r.stderr and "tok/s" in r.stderr and "KV cache f32" in r.stderr
    r = run_cli("generate", "--model", folder, "--temperature", "0", "--max-new-tokens", "12",
                "--kv-cache", "f16", "--verbose", text)
    assert r.returncode == 0 and "KV cache f16" in r.stderr, r.stderr
    r = run_cli("generate", "--model", folder, "word " * 80)
    assert_one_line_error(r, "81 tokens", "64")
    r = run_cli("generate", "--model", folder, "--truncate", "left", "--max-new-tokens", "3", "word " * 80)
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", "--model", folder / "missing", "hi")
    assert_one_line_error(r, "missing")


def test_generate_leaves_compiling_out_of_its_rates():
    """--verbose reports decode speed without the one-time numba compiles (a first run on a fresh
    machine printed ~55 tok/s for the demo model's ~2,500): compiling() counts compiles, not
    cache loads or runs."""
    from numba import njit

    from gptcpu.engine.cli import compiled_seconds, compiling

    f = njit(lambda x: x + 1)
    with compiling() as c:
        f(1)
    assert compiled_seconds(c) > 0
    with compiling() as again:
        f(2)
    assert compiled_seconds(again) == 0


def has_mkl() -> bool:
    from gptcpu.engine.blas import find_library
    return find_library("libmkl_rt.so*") is not None and find_library("libtbb.so.12") is not None


needs_mkl = pytest.mark.skipif(not has_mkl(), reason="needs the mkl extra (libmkl_rt and libtbb.so.12: "
                                                     "pip install 'gptcpu[mkl]')")


@pytest.mark.skipif(__import__("numba").config.NUMBA_NUM_THREADS < 2,
                    reason="needs 2 or more CPUs: with one, every thread's count is already 1")
def test_threads_hold_in_every_thread_that_runs_the_model(demo_engine):
    """numba keeps its thread count per Python thread; a model used from another thread (serve's
    scheduler, a Ray worker) must still run its kernels on the threads it was loaded with."""
    import threading

    import numba

    from gptcpu.engine import threads
    from gptcpu.engine.threads import set_threads

    set_threads(1)
    seen = []

    def work():
        seen.append(numba.get_num_threads())     # a fresh thread starts with numba's default
        list(demo_engine.generate([1, 2, 3], 2))
        seen.append(numba.get_num_threads())
        seen.append(threads.kernel_threads())    # what matvec splits by, without numba's locks

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [numba.config.NUMBA_NUM_THREADS, 1, 1]


def test_prompt_attention_keeps_numpy_blas_on_one_thread_and_gives_it_back():
    """Low-precision models run their GEMMs on the kernels' pool and prompt attention on
    NumPy's BLAS alone: one thread inside, the count before put back after."""
    from threadpoolctl import threadpool_info

    from gptcpu.engine import threads

    def blas_counts():
        return [p["num_threads"] for p in threadpool_info() if p["internal_api"] in ("openblas", "blis")]

    before = blas_counts()
    assert before, "NumPy's BLAS is not OpenBLAS or BLIS here"
    with threads.numpy_blas_on_one_thread():
        assert blas_counts() == [1] * len(before)
    assert blas_counts() == before


@needs_mkl
@pytest.mark.parametrize("backend,threading,expect", [
    ("mkl", "openmp", ["mkl", "(gnu)", "layer omp"]),
    ("mkl", "tbb", ["mkl", "(tbb)", "layer tbb"]),
    ("mkl", "sequential", ["(sequential): 1 threads", "layer workqueue"]),
    ("openblas", "tbb", ["backend openblas", "layer tbb"]),
])
def test_backend_and_threading_flags_take_effect(backend, threading, expect):
    r = run_cli("info", "--system", "--backend", backend, "--threading", threading, "--threads", "2")
    assert r.returncode == 0, r.stderr
    for e in expect:
        assert e in r.stdout, (e, r.stdout)
    if threading != "sequential":
        assert all(": 2 threads" in line for line in r.stdout.splitlines() if "threads  [" in line), r.stdout
    amx = backend == "mkl" and "amx_bf16" in blas.cpuinfo("flags").split()
    assert ("bf16 on MKL's" if amx else "bf16, f16 and q8 on the compiled") in r.stdout, r.stdout   # prefill


def test_default_backend_is_mkl_on_intel_cpus_where_installed():
    """MKL by default only where it won (a Xeon's prefill GEMMs), never where it lost (AMD) or
    is missing; $GPTCPU_BACKEND and --backend still decide over it."""
    import os
    import subprocess
    import sys

    from gptcpu.engine import blas
    assert blas.pick_backend("GenuineIntel", True) == "mkl"
    assert blas.pick_backend("GenuineIntel", False) == "openblas"
    assert blas.pick_backend("AuthenticAMD", True) == "openblas"
    assert blas.pick_backend("", True) == "openblas"
    env = {k: v for k, v in os.environ.items() if k not in ("GPTCPU_BACKEND", "GPTCPU_THREADING")}
    want = blas.pick_backend(blas.cpuinfo("vendor_id"), blas.find_library("libmkl_rt.so*") is not None)
    r = subprocess.run([sys.executable, "-m", "gptcpu.engine.cli", "info", "--system", "--threads", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"backend {want}" in r.stdout, (want, r.stdout)
    if want == "mkl":   # and on one pool with the kernels
        assert "(gnu)" in r.stdout and "layer omp" in r.stdout, r.stdout
    for r in (run_cli("info", "--system", "--backend", "openblas", "--threads", "2"),
              run_cli("info", "--system", "--threads", "2", env={"GPTCPU_BACKEND": "openblas"})):
        assert r.returncode == 0 and "backend openblas" in r.stdout, r.stdout + r.stderr


@needs_mkl
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_greedy_output_identical_across_backends(factory, dtype):
    folder = factory.converted("gptj", dtype)
    outs = set()
    for backend, threading in [("openblas", "openmp"), ("mkl", "openmp"), ("mkl", "tbb"), ("mkl", "sequential")]:
        r = run_cli("generate", "--model", folder, "--temperature", "0", "--max-new-tokens", "20",
                    "--backend", backend, "--threading", threading, "--threads", "2", "Hello world, this is")
        assert r.returncode == 0, r.stderr
        outs.add(r.stdout)
    assert len(outs) == 1
