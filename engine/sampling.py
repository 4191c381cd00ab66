"""Sampling: pure functions from logits to a token id, with an explicit seeded np.random.Generator.

The order is Hugging Face's: repetition penalty, then temperature, top-k, top-p. Temperature 0
is greedy (argmax). Everything is float32.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def apply_repetition_penalty(logits: np.ndarray, seen, penalty: float) -> np.ndarray:
    """CTRL's penalty, as HF applies it: seen tokens' logits / penalty if > 0, else * penalty."""
    if penalty == 1.0 or len(seen) == 0:
        return logits
    logits = logits.copy()
    idx = np.unique(np.asarray(seen, np.int64))
    x = logits[idx]
    logits[idx] = np.where(x > 0, x / F32(penalty), x * F32(penalty))
    return logits


def candidates(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """-> (token ids, their probabilities) of the set sampling draws from: most likely first, or,
    with neither top-k nor top-p, the whole vocabulary in id order (a draw needs no order, and
    sorting 50k logits would cost more than a decode step of a small model)."""
    x = logits.astype(F32) / F32(temperature)
    V = x.shape[-1]
    if 0 < top_k < V:
        ids = np.argpartition(-x, top_k - 1)[:top_k]
        ids = ids[np.argsort(-x[ids], kind="stable")]
        p = np.exp(x[ids] - x[ids[0]])
        p /= p.sum()
    else:
        p_all = np.exp(x - x.max())
        p_all /= p_all.sum()
        if top_p >= 1.0:
            return np.arange(V), p_all
        # the nucleus lies within the top k once their mass reaches top_p: sort only those
        k = 64
        while k < V:
            top = np.argpartition(-x, k - 1)[:k]
            if p_all[top].sum() >= top_p:
                break
            k *= 4
        else:
            top = np.arange(V)
        ids = top[np.argsort(-x[top], kind="stable")]
        p = p_all[ids]
    if top_p < 1.0:
        # the smallest prefix whose mass reaches top_p (the token that crosses it is kept)
        keep = int(np.searchsorted(np.cumsum(p), F32(top_p))) + 1
        ids, p = ids[:keep], p[:keep] / p[:keep].sum()
    return ids, p


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0) -> int:
    """One token id from logits [V]: greedy at temperature 0, else drawn from the top-k/top-p set."""
    if temperature <= 0:
        return int(np.argmax(logits))
    if not 0 < top_k < logits.shape[-1] and top_p >= 1.0:  # the whole vocabulary, in id order
        e = logits / F32(temperature)
        e -= e.max()
        return draw(np.exp(e, out=e), rng.random(dtype=F32))
    ids, p = candidates(logits, temperature, top_k, top_p)
    return int(ids[draw(p, rng.random(dtype=F32))])


def draw(weights: np.ndarray, u, block: int = 1024) -> int:
    """The index where the running sum of weights [V] (unnormalized, >= 0) first exceeds u x
    their total, u in [0, 1): inverse-CDF sampling. The sum runs over blocks first, then within
    the one block that holds the crossing: a full np.cumsum is one 50k-long chain of dependent
    adds (0.13 ms, a tenth of a small model's decode step per sequence)."""
    V = len(weights)
    n = V // block * block
    sums = weights[:n].reshape(-1, block).sum(1)
    if n < V:
        sums = np.append(sums, weights[n:].sum())
    cum = np.cumsum(sums)
    target = u * cum[-1]
    b = min(int(np.searchsorted(cum, target, side="right")), len(cum) - 1)
    within = target - (cum[b - 1] if b else 0)
    j = b * block + int(np.searchsorted(np.cumsum(weights[b * block:(b + 1) * block]), within, side="right"))
    return min(j, V - 1)


def apply_penalties(logits: np.ndarray, generated, presence: float = 0.0, frequency: float = 0.0,
                    bias: dict[int, float] | None = None) -> np.ndarray:
    """OpenAI's presence and frequency penalties over the tokens generated so far (each seen
    token loses presence + frequency x its count), then a logit bias {token id: added value}."""
    if not ((presence or frequency) and len(generated)) and not bias:
        return logits
    logits = logits.copy()
    if (presence or frequency) and len(generated):
        ids, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
        logits[ids] -= (F32(presence) + F32(frequency) * counts).astype(F32)
    if bias:
        logits[list(bias)] += np.array(list(bias.values()), F32)
    return logits
