"""gptcpu eval: sliding-window perplexity, the same number transformers gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gptcpu
from gptcpu.engine.evaluate import evaluate, windows
from test_convert import run_cli

TEXT = '''def fib(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)
'''


@pytest.mark.parametrize("n,n_ctx,stride", [(10, 4, 2), (100, 64, 32), (65, 64, 1), (3, 64, 32), (200, 16, 15)])
def test_windows_score_every_token_once_with_context(n, n_ctx, stride):
    scored = []
    for begin, end, first in windows(n, n_ctx, stride):
        assert end - begin <= n_ctx and begin < first <= end
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_perplexity_equals_transformers(factory, workdir):
    files = [workdir / "a.py", workdir / "b.txt"]
    files[0].write_text(TEXT)
    files[1].write_text("Plain text, ünïcode too. " * 12)
    model = gptcpu.load(factory.converted("gpt2"))
    hf = factory.hf_model("gpt2")

    def hf_logits(ids):
        with torch.no_grad():
            return hf(torch.tensor(ids)[None]).logits[0].numpy()

    ours = evaluate(model, files, stride=16)
    ref = evaluate(model, files, stride=16, logits_fn=hf_logits)
    assert ours.tokens == ref.tokens > 2 * model.config.n_ctx   # several windows
    assert ours.perplexity == pytest.approx(ref.perplexity, rel=1e-5)
    assert ours.bytes == len(TEXT.encode()) + len(("Plain text, ünïcode too. " * 12).encode())
    # and the definition, by hand: one window over a short file
    short = workdir / "short.txt"
    short.write_text("Hello world, this is a test.")
    ids = [model.config.eos_token_id] + model.tokenizer.encode(short.read_text())
    logits = hf_logits(ids)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -sum(logp[t - 1, ids[t]] for t in range(1, len(ids)))
    assert evaluate(model, [short]).nll == pytest.approx(nll, rel=1e-5)


def test_eval_cli(factory, workdir):
    f = workdir / "text.txt"
    f.write_text(TEXT)
    r = run_cli("eval", factory.converted("gpt2"), f, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] > 50 and out["perplexity"] > 1 and out["bits_per_byte"] > 0
    r = run_cli("eval", factory.converted("gpt2"), workdir / "nope.txt")
    assert r.returncode == 2 and "nope.txt" in r.stderr
