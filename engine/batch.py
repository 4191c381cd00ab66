"""Continuous batching: a decode batch whose members join and leave between steps.

A `Member` is one sequence being generated: its prompt, its sampling settings, its random
generator, the tokens so far, and while it is in a Batch, its slot (row) of the batch's KV cache.
`Batch.step()` runs one forward pass over every member (`Model.forward_ragged`): a decoding
member feeds its last token, a member still prefilling feeds the next chunk of its prompt. The
weight matrices are read once per step for all of them, which is what makes a batch of B nearly
as cheap as one sequence when decode is bound by memory.

A member's tokens are the ones it gets alone with the same seed: it samples from its own
generator, and attention reads only its own slot. `generate` and `generate_batch` are loops
over a Batch; the server's scheduler is another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import GptcpuError
from .kv_cache import SlotCache
from .model import check_ids
from .sampling import apply_penalties, apply_repetition_penalty, sample


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


@dataclass
class Sampling:
    """How one sequence is generated. temperature 0 is greedy; top_k 0 and top_p 1 are off.

    logprobs: None, or report each new token's log-probability and this many most likely
    alternatives (log-softmax of the model's raw logits, before penalty and temperature).
    prompt_logprobs: the same for every prompt token after the first.
    """
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: bool = False
    presence_penalty: float = 0.0      # OpenAI's, over the generated tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None


@dataclass
class Logprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # most likely first


def logprobs_of(logits: np.ndarray, tokens, n_top: int) -> list[Logprob]:
    """logits [T, V], the token that followed each row -> its log-probability and the top n_top."""
    x = logits - logits.max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    out = []
    for row, t in zip(lp, tokens):
        top = []
        if n_top > 0:
            ids = np.argpartition(-row, min(n_top, len(row)) - 1)[:n_top]
            top = [(int(i), float(row[i])) for i in ids[np.argsort(-row[ids], kind="stable")]]
        out.append(Logprob(int(t), float(row[t]), top))
    return out


class Member:
    """One sequence of a Batch. Read `output`, `finish` ("stop": EOS or a stop string; "length":
    max_new_tokens or the context; None: running), `logprobs` and `prompt_logprobs`."""

    def __init__(self, model, prompt, sampling: Sampling | None = None, truncate: str | None = None):
        s = sampling or Sampling()
        c = model.config
        self.config, self.sampling = c, s
        self.prompt = fit_prompt([int(t) for t in prompt], c.n_ctx, s.max_new_tokens, truncate)
        check_ids(self.prompt, c.n_vocab)
        if s.logit_bias and not all(0 <= t < c.n_vocab for t in s.logit_bias):
            raise GptcpuError(f"logit_bias names a token outside the vocabulary of {c.n_vocab}")
        self.stops = StopStrings(model.tokenizer, s.stop)
        self.rng = np.random.default_rng(s.seed)
        self.slot: int | None = None        # its row of the batch's KV cache, while a member
        self.fed = 0                        # prompt tokens already in the cache
        self.output: list[int] = []
        self.logprobs: list[Logprob] = []
        self.prompt_logprobs: list[Logprob] = []
        self.finish: str | None = None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def feed(self, budget: int | None) -> list[int]:
        """The tokens this member puts into the next step (at most budget prompt tokens)."""
        if not self.prefilling:
            return self.output[-1:]
        n = len(self.prompt) - self.fed if budget is None else min(budget, len(self.prompt) - self.fed)
        return self.prompt[self.fed:self.fed + n]

    def take(self, fed: list[int], logits: np.ndarray) -> int | None:
        """The step's logits for the tokens fed -> the new token, or None while still prefilling."""
        s = self.sampling
        if self.prefilling:
            start = self.fed
            self.fed += len(fed)
            if s.prompt_logprobs:   # row j predicts prompt token start + j + 1
                follow = self.prompt[start + 1:self.fed + 1]
                self.prompt_logprobs += logprobs_of(logits[:len(follow)], follow, s.logprobs or 0)
            if self.prefilling:
                return None
        row = logits[-1]
        scored = apply_repetition_penalty(row, self.prompt + self.output, s.repetition_penalty)
        scored = apply_penalties(scored, self.output, s.presence_penalty, s.frequency_penalty, s.logit_bias)
        token = sample(scored, self.rng, s.temperature, s.top_k, s.top_p)
        if s.logprobs is not None:
            self.logprobs += logprobs_of(row[None], [token], s.logprobs)
        self.output.append(token)
        c = self.config
        if token == c.eos_token_id or self.stops.hit(self.output):
            self.finish = "stop"
        elif len(self.output) == s.max_new_tokens or len(self.prompt) + len(self.output) >= c.n_ctx:
            self.finish = "length"
        return token


class Batch:
    """The running members of a continuously batched generation.

    max_batch bounds the members; prefill_chunk bounds the prompt tokens all prefilling members
    feed into one step together (None: whole prompts at once), so a newcomer's prompt delays
    the members already decoding by at most one chunk per step. A prompt is always cut into
    the same chunks, and Model.forward_ragged keeps each row's numbers independent of the rows
    beside it, so a member's logits are those it gets alone (to the last bits of the LM head).
    """

    def __init__(self, model, max_batch: int = 8, prefill_chunk: int | None = 128, capacity: int | None = None):
        if max_batch < 1:
            raise GptcpuError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        self.capacity = min(capacity or model.config.n_ctx, model.config.n_ctx)   # tokens per member
        self.cache = SlotCache(model.config, max_batch, self.capacity, model.kv_cache)
        self.members: list[Member] = []

    def __len__(self) -> int:
        return len(self.members)

    @property
    def free(self) -> int:
        return self.max_batch - len(self.members)

    def add(self, member: Member) -> Member:
        if not self.free:
            raise GptcpuError(f"the batch is full ({self.max_batch} members)")
        need = len(member.prompt) + member.sampling.max_new_tokens
        if min(need, self.model.config.n_ctx) > self.capacity:
            raise GptcpuError(f"the member needs {need} tokens of cache; this batch holds {self.capacity} each")
        member.slot = self.cache.acquire()
        self.members.append(member)
        return member

    def remove(self, member: Member) -> None:
        """Drop a member between steps (its cache slot is freed for the next)."""
        if member in self.members:
            self.members.remove(member)
            self.cache.release(member.slot)

    def step(self) -> list[tuple[Member, int]]:
        """One forward pass over every member -> (member, new token) for those that produced one.
        Finished members leave the batch."""
        budget = self.prefill_chunk
        feeding = []
        for m in self.members:
            ids = m.feed(self.prefill_chunk)
            if m.prefilling and budget is not None:
                # a prompt is cut at the same places alone or in a batch (its numbers must not
                # depend on the others): it waits while its next whole chunk does not fit
                if len(ids) > budget:
                    continue
                budget -= len(ids)
            feeding.append((m, ids))
        if not feeding:
            return []
        logits = self.model.forward_ragged(
            self.cache, [(m.slot, ids, m.prefilling and m.sampling.prompt_logprobs) for m, ids in feeding])
        produced = []
        for (m, ids), lg in zip(feeding, logits):
            token = m.take(ids, lg)
            if token is not None:
                produced.append((m, token))
        for m in [m for m in self.members if m.finish is not None]:
            self.remove(m)
        return produced
