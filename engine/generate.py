"""The generation loops: prefill the prompt into a KV cache, then decode one token at a time.

Both are loops over a continuous batch (gptcpu.engine.batch). Only the last position goes through
the LM head. Generation ends at max_new_tokens, at EOS (which is yielded, as Hugging Face's
generate keeps it), after the token that completes a stop string, or when the context is full.
"""

from __future__ import annotations

from typing import Iterator

from .batch import Batch, Member, Sampling


def generate(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed=None, stop=None, repetition_penalty: float = 1.0, truncate: str | None = None) -> Iterator[int]:
    s = Sampling(max_new_tokens, temperature, top_k, top_p, seed, stop, repetition_penalty)
    member = Member(model, ids, s, truncate)
    batch = Batch(model, max_batch=1, prefill_chunk=None, capacity=len(member.prompt) + max_new_tokens)
    batch.add(member)
    while batch:
        for _, token in batch.step():
            yield token


def generate_batch(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, seed=None, stop=None, repetition_penalty: float = 1.0,
                   truncate: str | None = None) -> list[list[int]]:
    """Run prompts together, each stopping on its own -> the new ids of each.

    A row's tokens are those it would get alone with the same seed (an int seed applies to
    every row; pass a list for one per row).
    """
    seeds = seed if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    members = [Member(model, p, Sampling(max_new_tokens, temperature, top_k, top_p, s, stop, repetition_penalty),
                      truncate) for p, s in zip(prompts, seeds)]
    longest = max((len(m.prompt) for m in members), default=0) + max_new_tokens
    batch = Batch(model, max_batch=max(1, len(prompts)), prefill_chunk=None, capacity=longest)
    for m in members:
        batch.add(m)
    while batch:
        batch.step()
    return [m.output for m in members]
