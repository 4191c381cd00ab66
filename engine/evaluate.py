"""`gptcpu eval`: perplexity and bits per byte over text files, with a sliding window.

The files become one token stream, each preceded by the end-of-text token (so every token of
every file is predicted, the first from `<|endoftext|>` alone, as a model trained on documents
joined by that token expects). Windows of the model's context slide by `stride` tokens; each
window scores only the tokens no earlier window scored, so every token is scored once, with
at least n_ctx - stride tokens of context once the stream is long enough (the method of Hugging
Face's perplexity guide, so transformers computes the very same number).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .errors import GptcpuError


@dataclass
class Perplexity:
    tokens: int        # tokens scored
    bytes: int         # UTF-8 bytes of the text they encode
    nll: float         # total negative log-likelihood, nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "bytes": self.bytes, "nll_per_token": self.nll / self.tokens,
                "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def windows(n: int, n_ctx: int, stride: int) -> Iterable[tuple[int, int, int]]:
    """(begin, end, first scored target) for windows over n tokens; targets are positions >= 1."""
    prev_end = 1  # position 0 is never a target: nothing precedes it
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + n_ctx, n)
        if end <= prev_end:
            break
        yield begin, end, prev_end
        prev_end = end
        if end == n:
            break


def nll_of_window(logits: np.ndarray, ids: np.ndarray, first: int) -> float:
    """Sum of -log p(ids[t] | ids[:t]) over targets t >= first of a window; logits [T, V] predict ids[1:]."""
    x = logits[first - 1:-1].astype(np.float32)            # the rows predicting targets first..T-1
    target = ids[first:]
    m = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1)) + m[:, 0]
    return float((lse - x[np.arange(len(target)), target]).sum(dtype=np.float64))


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, n_ctx: int, stride: int,
               progress=None) -> float:
    """Total NLL (nats) of ids under logits_fn (ids [T] -> logits [T, V]), sliding windows."""
    total = 0.0
    for begin, end, first in windows(len(ids), n_ctx, stride):
        window = ids[begin:end]
        total += nll_of_window(logits_fn(window), window, first - begin)
        if progress is not None:
            progress.update(end - first)
    return total


def evaluate(model, files: list[str | Path], stride: int | None = None, show_progress: bool | None = None,
             logits_fn=None) -> Perplexity:
    """Perplexity of model over the files (read as UTF-8), windows of its context."""
    import sys

    from tqdm import tqdm

    if model.tokenizer is None:
        raise GptcpuError(f"{model.path} has no tokenizer.json")
    n_ctx = model.config.n_ctx
    stride = stride or n_ctx // 2
    if not 0 < stride < n_ctx:
        raise GptcpuError(f"stride must be from 1 to the context minus one ({n_ctx - 1}), got {stride}")
    eot = model.config.eos_token_id if model.config.eos_token_id is not None else model.config.bos_token_id
    if eot is None:
        raise GptcpuError("the model has no end-of-text token to separate files with")
    stream, nbytes = [], 0
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GptcpuError(f"cannot read {f}: {e}") from None
        stream += [eot] + model.tokenizer.encode(text)
        nbytes += len(text.encode("utf-8"))
    ids = np.array(stream, np.int64)
    if len(ids) < 2:
        raise GptcpuError("the files hold no text to score")
    show = sys.stderr.isatty() if show_progress is None else show_progress
    with tqdm(total=len(ids) - 1, unit="tok", desc="eval", disable=not show) as bar:
        nll = perplexity(logits_fn or model.logits, ids, n_ctx, stride, bar)
    return Perplexity(tokens=len(ids) - 1, bytes=nbytes, nll=nll)
