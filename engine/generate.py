"""The generation loop: prefill the prompt into a KV cache, then decode one token at a time.

Only the last position goes through the LM head. Generation ends at max_new_tokens, at EOS (which
is yielded, as Hugging Face's generate keeps it), after the token that completes a stop string,
or when the context is full.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .errors import GptcpuError
from .sampling import apply_repetition_penalty, sample


def fit_prompt(ids: list[int], n_ctx: int, max_new_tokens: int, truncate: str | None) -> list[int]:
    """The prompt, checked against the context (or cut from the left, keeping room for new tokens)."""
    if len(ids) == 0:
        raise GptcpuError("the prompt is empty")
    if max_new_tokens < 1:
        raise GptcpuError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if len(ids) < n_ctx:
        return ids
    if truncate == "left":
        return ids[-max(1, n_ctx - max_new_tokens):]
    if truncate not in (None, "none"):
        raise GptcpuError(f"unknown truncation {truncate!r}; use 'left' or none")
    raise GptcpuError(f"the prompt is {len(ids)} tokens but the context holds {n_ctx} (and needs room "
                      "for one new token): shorten it or pass --truncate left")


class StopStrings:
    """Has the generated text just completed one of the stop strings?"""

    def __init__(self, tokenizer, stop):
        self.stop = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        if self.stop and tokenizer is None:
            raise GptcpuError("stop strings need the model's tokenizer")
        self.tokenizer = tokenizer
        # a stop string of n characters lies within the last n + 4 tokens (a token can be a
        # fragment of one UTF-8 character, up to 4 bytes)
        self.window = max((len(s) for s in self.stop), default=0) + 4

    def hit(self, generated: list[int]) -> bool:
        if not self.stop:
            return False
        tail = self.tokenizer.decode(generated[-self.window:])
        return any(s in tail for s in self.stop)


def generate(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed=None, stop=None, repetition_penalty: float = 1.0, truncate: str | None = None) -> Iterator[int]:
    c = model.config
    ids = fit_prompt([int(t) for t in ids], c.n_ctx, max_new_tokens, truncate)
    stops = StopStrings(model.tokenizer, stop)
    rng = np.random.default_rng(seed)
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    logits = model.forward(np.array([ids]), cache, last_only=True)[0, -1]
    context, generated = list(ids), []
    while True:
        logits = apply_repetition_penalty(logits, context, repetition_penalty)
        token = sample(logits, rng, temperature, top_k, top_p)
        context.append(token)
        generated.append(token)
        yield token
        if (token == c.eos_token_id or len(generated) == max_new_tokens or len(context) == c.n_ctx
                or stops.hit(generated)):
            return
        logits = model.forward(np.array([[token]]), cache, last_only=True)[0, -1]


def generate_batch(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, seed=None, stop=None, repetition_penalty: float = 1.0,
                   truncate: str | None = None) -> list[list[int]]:
    """Run prompts together: left-padded into one batch, each row stopping on its own.

    A row's tokens are those it would get alone with the same seed (an int seed applies to
    every row; pass a list for one per row).
    """
    c = model.config
    prompts = [fit_prompt([int(t) for t in p], c.n_ctx, max_new_tokens, truncate) for p in prompts]
    B, T = len(prompts), max(len(p) for p in prompts)
    seeds = seed if isinstance(seed, (list, tuple)) else [seed] * B
    rngs = [np.random.default_rng(s) for s in seeds]
    stops = StopStrings(model.tokenizer, stop)
    pad = c.eos_token_id if c.eos_token_id is not None else 0
    ids = np.full((B, T), pad, np.int64)
    mask = np.zeros((B, T), bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
        mask[b, T - len(p):] = True
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model.forward(ids, cache, mask, last_only=True)[:, -1]   # [B, V]
    contexts = [list(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    running = [True] * B
    while True:
        step = np.full((B, 1), pad, np.int64)
        for b in range(B):
            if not running[b]:
                continue
            row = apply_repetition_penalty(logits[b], contexts[b], repetition_penalty)
            token = sample(row, rngs[b], temperature, top_k, top_p)
            contexts[b].append(token)
            outputs[b].append(token)
            step[b, 0] = token
            running[b] = not (token == c.eos_token_id or len(outputs[b]) == max_new_tokens
                              or len(contexts[b]) == c.n_ctx or stops.hit(outputs[b]))
        if not any(running) or cache.length == cache.capacity:
            return outputs
        logits = model.forward(step, cache, np.array(running)[:, None], last_only=True)[:, -1]
