"""The embedded demo model: a trained GPT-2 that gptcpu ships and `make demo` runs."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

import gptcpu
from checkpoints import ROOT
from gptcpu.engine.evaluate import evaluate
from test_convert import run_cli

DEMO = ROOT / "engine" / "demo"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return gptcpu.convert(str(DEMO), tmp_path_factory.mktemp("demo") / "demo-f32", dtype="f32", progress=False)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(DEMO).eval()


def test_demo_checkpoint_is_small_and_converts(demo):
    assert sum(f.stat().st_size for f in DEMO.iterdir()) < 10 << 20
    m = gptcpu.load(demo)
    assert (m.config.arch, m.config.n_vocab, m.config.n_ctx, m.config.n_layer) == ("gpt2", 4096, 256, 4)
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # ünïcode\n"
    assert m.tokenizer.decode(m.tokenizer.encode(text)) == text


def test_demo_greedy_tokens_equal_transformers(demo, hf):
    m = gptcpu.load(demo)
    ids = m.tokenizer.encode("import os\n\n\ndef main(argv):\n")
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=40, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    got = list(m.generate(ids, 40))
    assert got == want[:len(got)] and len(got) >= 1  # EOS may end both early
    text = m.tokenizer.decode(got)
    assert "\n    " in text  # a trained model writes an indented body, not noise


def test_demo_perplexity_equals_transformers(demo, hf, tmp_path):
    m = gptcpu.load(demo)
    f = tmp_path / "sample.py"
    f.write_text((ROOT / "engine" / "batch.py").read_text())  # Python the model never saw
    ours = evaluate(m, [f], stride=64)

    def hf_logits(ids):
        with torch.no_grad():
            return hf(torch.as_tensor(ids)[None]).logits[0].numpy()

    ref = evaluate(m, [f], stride=64, logits_fn=hf_logits)
    assert ours.tokens == ref.tokens > 1000
    assert f"{ours.perplexity:.4g}" == f"{ref.perplexity:.4g}"  # 4 significant digits
    assert ours.perplexity < 100  # trained: a uniform guess over 4,096 tokens would give 4,096


def test_demo_held_out_perplexity(demo):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / p for p in (DEMO / "test_files.txt").read_text().split()]
    present = [f for f in files if f.exists()][:4]
    if not present:
        pytest.skip(f"none of the held-out standard-library files is under {stdlib}")
    r = evaluate(gptcpu.load(demo), present, stride=128)
    print(f"held-out sample: {r.tokens} tokens, perplexity {r.perplexity:.2f}, {r.bits_per_byte:.3f} bits/byte")
    assert r.perplexity < 60  # TRAINING.md: 27.7 on the whole test split


def test_fixed_seed_text_is_stable(demo):
    args = ("generate", "--model", demo, "--seed", "7", "--max-new-tokens", "30", "def fib(n):")
    a, b = run_cli(*args), run_cli(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and len(a.stdout.strip()) > 10
    m = gptcpu.load(demo)
    ids = list(m.generate(m.tokenizer.encode("def fib(n):"), 30, temperature=0.8, top_k=40, top_p=0.95, seed=7))
    assert a.stdout == m.tokenizer.decode(ids) + "\n"  # the CLI's defaults are the documented ones


def test_generate_without_model_uses_the_demo(tmp_path):
    env = {"GPTCPU_HOME": str(tmp_path), "GPTCPU_MODEL": ""}
    r = run_cli("generate", "--seed", "0", "--max-new-tokens", "12", "def f(x):", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "models" / "demo-f32" / "model.safetensors").exists()
    again = run_cli("generate", "--seed", "0", "--max-new-tokens", "12", "def f(x):", env=env)
    assert again.stdout == r.stdout
