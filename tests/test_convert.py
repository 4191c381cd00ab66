"""gptcpu convert: every source layout and dtype, the folder format, and every error path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import gptcpu
from gptcpu.convert.maps import ARCHS
from gptcpu.engine.config import Config
from gptcpu.engine.errors import GptcpuError
from gptcpu.engine.tokenizer import Tokenizer
from gptcpu.engine.weights import bf16_to_f32, mmap_tensors


def expected_tensors(model, config: Config) -> dict[str, np.ndarray]:
    """What each canonical tensor must hold, computed from the HF model with torch."""
    sd = {k.removeprefix("transformer."): v.detach().float() for k, v in model.state_dict().items()}
    out = {"wte": sd["wte.weight"], "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}
    for i in range(config.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2") if config.arch == "gpt2" else ("ln_1",):
            out[b + ln + ".weight"], out[b + ln + ".bias"] = sd[h + ln + ".weight"], sd[h + ln + ".bias"]
        if config.arch == "gpt2":
            out |= {b + "attn.w_qkv": sd[h + "attn.c_attn.weight"], b + "attn.b_qkv": sd[h + "attn.c_attn.bias"],
                    b + "attn.w_o": sd[h + "attn.c_proj.weight"], b + "attn.b_o": sd[h + "attn.c_proj.bias"],
                    b + "mlp.w_in": sd[h + "mlp.c_fc.weight"], b + "mlp.b_in": sd[h + "mlp.c_fc.bias"],
                    b + "mlp.w_out": sd[h + "mlp.c_proj.weight"], b + "mlp.b_out": sd[h + "mlp.c_proj.bias"]}
        else:
            q, k, v = (sd[h + f"attn.{n}_proj.weight"].T for n in "qkv")
            out[b + "w_in"] = torch.cat([q, k, v, sd[h + "mlp.fc_in.weight"].T], 1)
            out[b + "b_in"] = torch.cat([torch.zeros(3 * config.n_embd), sd[h + "mlp.fc_in.bias"]])
            out[b + "w_out"] = torch.cat([sd[h + "attn.out_proj.weight"].T, sd[h + "mlp.fc_out.weight"].T], 0)
            out[b + "b_out"] = sd[h + "mlp.fc_out.bias"]
    if config.arch == "gpt2":
        out["wpe"] = sd["wpe.weight"]
    if not config.tied_head:
        out["lm_head.weight"] = model.lm_head.weight.detach().T
    if config.head_bias:
        out["lm_head.bias"] = model.lm_head.bias.detach()
    return {k: v.contiguous().numpy() for k, v in out.items()}


# original-bin is GPT-2's own layout (OpenAI's port); GPT-J never shipped one
@pytest.mark.parametrize("shape,layout", [("gpt2", layout) for layout in checkpoints.LAYOUTS]
                         + [("gptj", layout) for layout in checkpoints.LAYOUTS if layout != "original-bin"])
def test_every_layout_converts_exactly_at_f32(factory, shape, layout):
    out = factory.converted(shape, "f32", layout)
    config = Config.load(out)
    tensors = mmap_tensors(out / "model.safetensors")
    want = expected_tensors(factory.hf_model(shape), config)
    assert set(tensors) == set(want)
    for name, w in want.items():
        assert tensors[name].dtype == np.float32, name
        np.testing.assert_array_equal(tensors[name], w, err_msg=name)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("shape", ["gpt2", "gptj-odd"])
def test_half_precision_weights_round_and_vectors_stay_f32(factory, shape, dtype):
    out = factory.converted(shape, dtype)
    config = Config.load(out)
    assert config.dtype == dtype
    tensors = mmap_tensors(out / "model.safetensors")
    outputs = {o.name: o for o in ARCHS[config.arch].outputs(config)}
    for name, w in expected_tensors(factory.hf_model(shape), config).items():
        t = tensors[name]
        if not outputs[name].is_weight:
            assert t.dtype == np.float32, name
            np.testing.assert_array_equal(t, w, err_msg=name)
        elif dtype == "f16":
            assert t.dtype == np.float16, name
            np.testing.assert_array_equal(t, w.astype(np.float16), err_msg=name)
        else:  # bf16 must round to nearest even exactly as torch does
            assert t.dtype == np.uint16, name
            ref = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            np.testing.assert_array_equal(t, ref, err_msg=name)
            assert np.abs(bf16_to_f32(t) - w).max() <= np.abs(w).max() * 2 ** -8


@pytest.mark.parametrize("shape", ["gpt2-untied", "gptj"])
def test_q8_round_trip_error_bound(factory, shape):
    """Symmetric per-output-channel int8: |w - q * scale| <= scale / 2 for every weight."""
    out = factory.converted(shape, "q8")
    config = Config.load(out)
    tensors = mmap_tensors(out / "model.safetensors")
    want = expected_tensors(factory.hf_model(shape), config)
    for o in ARCHS[config.arch].outputs(config):
        t, w = tensors[o.name], want[o.name]
        if not o.is_weight:
            assert t.dtype == np.float32
            continue
        scale = tensors[o.name + ".scale"]
        assert t.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (o.channels,)
        s = scale[:, None] if o.per_row else scale
        assert np.abs(t).max() <= 127
        err = np.abs(t.astype(np.float64) * s - w)
        assert (err <= s / 2 * (1 + 1e-6) + 1e-7 * np.abs(w)).all(), o.name
        absmax = np.abs(w).max(axis=1 if o.per_row else 0)
        np.testing.assert_allclose(scale, absmax / 127, rtol=1e-6)


def test_folder_format(factory, tokenizer_files):
    out = factory.converted("gptj", "f16")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    for key in ("format", "arch", "n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "n_inner", "rotary_dim",
                "layer_norm_epsilon", "activation", "bos_token_id", "eos_token_id", "dtype", "source"):
        assert key in cfg, key
    assert cfg["format"] == "gptcpu/1" and cfg["arch"] == "gptj" and cfg["rotary_dim"] == 8
    assert cfg["n_inner"] == 4 * 48 and cfg["n_vocab"] == 50400
    assert cfg["source"]["model_type"] == "gptj" and cfg["source"]["files"] == ["model.safetensors"]
    assert cfg["source"]["path"].endswith("hf-gptj-safetensors")
    # the file opens with the safetensors library itself, data aligned to each dtype
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.get_tensor("ln_f.weight").dtype == np.float32
        assert f.get_tensor("blocks.0.w_in").shape == (48, 3 * 48 + 192)


def test_tokenizer_round_trip(factory):
    tok = Tokenizer.from_folder(factory.converted("gpt2", "f32"))
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("<|endoftext|>") == [50256]
    text = "def f(x):\n    return x ** 2  # héllo, 日本語 🙂\n\n"
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_built_from_vocab_and_merges(factory, workdir, tokenizer_files):
    src = workdir / "hf-no-tokenizer-json"
    shutil.copytree(factory.checkpoint("gpt2", "original-bin"), src, dirs_exist_ok=True)
    (src / "tokenizer.json").unlink()
    out = gptcpu.convert(str(src), workdir / "from-vocab-merges", dtype="f32")
    built, ref = Tokenizer.from_folder(out), Tokenizer.from_folder(tokenizer_files)
    text = "Hello world <|endoftext|> ünïcödé\n\tindented  spaces"
    assert built.encode(text) == ref.encode(text)
    assert built.decode(built.encode(text), skip_special_tokens=False) == text


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gptcpu.engine.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def assert_one_line_error(r, *fragments):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptcpu"), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def mutate(factory, workdir, name, edit):
    """A copy of the tiny GPT-2 .bin checkpoint with its state dict or config edited."""
    src = workdir / name
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(factory.checkpoint("gpt2", "original-bin"), src)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    cfg = json.loads((src / "config.json").read_text())
    edit(state, cfg)
    torch.save(state, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def test_errors_are_one_line_and_leave_nothing(factory, workdir):
    out = workdir / "never"

    def wrong_shape(state, cfg):
        state["h.1.mlp.c_fc.weight"] = torch.zeros(48, 100)

    r = run_cli("convert", mutate(factory, workdir, "bad-shape", wrong_shape), "--out", out)
    assert_one_line_error(r, "h.1.mlp.c_fc.weight", "[48, 100]", "[48, 192]")

    r = run_cli("convert", mutate(factory, workdir, "missing", lambda s, c: s.pop("h.0.ln_2.bias")), "--out", out)
    assert_one_line_error(r, "lacks tensor h.0.ln_2.bias")

    r = run_cli("convert", mutate(factory, workdir, "extra", lambda s, c: s.update(foo=torch.zeros(2))), "--out", out)
    assert_one_line_error(r, "unexpected tensor foo")

    r = run_cli("convert", mutate(factory, workdir, "llama", lambda s, c: c.update(model_type="llama")), "--out", out)
    assert_one_line_error(r, "'llama'", "gpt2", "gptj")

    def too_big_for_f16(state, cfg):
        state["h.0.mlp.c_proj.weight"][3, 4] = 1e5

    r = run_cli("convert", mutate(factory, workdir, "huge", too_big_for_f16), "--out", out, "--dtype", "f16")
    assert_one_line_error(r, "blocks.0.mlp.w_out", "overflow f16", "bf16")

    r = run_cli("convert", workdir / "does-not-exist", "--out", out)
    assert_one_line_error(r, "does-not-exist")

    r = run_cli("convert", factory.checkpoint("gpt2"), "--out", out, "--dtype", "f64")
    assert r.returncode == 2 and "f64" in r.stderr

    # an offline hub: the download fails with one line, not a traceback
    r = run_cli("convert", "EleutherAI/gpt-j-6b", "--out", out, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(r, "EleutherAI/gpt-j-6b")

    assert not out.exists()
    assert not [p for p in workdir.iterdir() if ".partial-" in p.name]


def test_truncated_shard_fails_cleanly(factory, workdir):
    src = workdir / "truncated"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(factory.checkpoint("gptj", "sharded-bin"), src)
    shard = src / "pytorch_model-00002-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = workdir / "from-truncated"
    r = run_cli("convert", src, "--out", out)
    assert_one_line_error(r, "pytorch_model-00002-of-00003.bin")
    assert not out.exists() and not [p for p in workdir.iterdir() if ".partial-" in p.name]


def test_legacy_torch_format(factory, workdir):
    """A pre-1.6 torch file (not a zip archive) cannot be mmap'd: it is read whole, with a warning."""
    src = workdir / "legacy"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(factory.checkpoint("gpt2", "original-bin"), src)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.warns(UserWarning, match="legacy format"):
        out = gptcpu.convert(str(src), workdir / "from-legacy", dtype="f32")
    want = mmap_tensors(factory.converted("gpt2", "f32", "original-bin") / "model.safetensors")
    got = mmap_tensors(out / "model.safetensors")
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_existing_output_needs_force(factory, workdir):
    out = workdir / "existing"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("mine")
    r = run_cli("convert", factory.checkpoint("gpt2"), "--out", out, "--dtype", "f32")
    assert_one_line_error(r, "--force")
    assert (out / "keep.txt").read_text() == "mine"
    r = run_cli("convert", factory.checkpoint("gpt2"), "--out", out, "--dtype", "f32", "--force",
                env={"GPTCPU_HOME": str(workdir / "home")})
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert (workdir / "home" / "default-model").read_text().strip() == str(out.resolve())
    assert not [p for p in workdir.iterdir() if ".old-" in p.name]


def test_interrupted_convert_leaves_nothing(factory, workdir, monkeypatch):
    import gptcpu.convert.writer as writer

    def interrupted(self, name, array):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.SafetensorsWriter, "write", interrupted)
    out = workdir / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        gptcpu.convert(str(factory.checkpoint("gpt2")), out, dtype="f32")
    assert not out.exists() and not [p for p in workdir.iterdir() if ".partial-" in p.name]


def test_full_disk_or_unwritable_output_is_one_line(factory, workdir, monkeypatch):
    """An OSError while writing (here a full disk) is a GptcpuError naming it, nothing left behind;
    an output folder that cannot be made is one line from the CLI."""
    import errno

    import gptcpu.convert.writer as writer

    def full(self, name, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(writer.SafetensorsWriter, "write", full)
        out = workdir / "full-disk"
        with pytest.raises(GptcpuError, match="No space left on device"):
            gptcpu.convert(str(factory.checkpoint("gpt2")), out, dtype="f32")
    assert not out.exists() and not [p for p in workdir.iterdir() if ".partial-" in p.name]
    (workdir / "a-file").write_text("not a folder")
    r = run_cli("convert", factory.checkpoint("gpt2"), "--out", workdir / "a-file" / "model", "--dtype", "f32")
    assert_one_line_error(r, "a-file")
