"""The KV cache: one preallocated object per generation, shared by prefill and decode.

Keys and values live in one array per kind, `[L, B, H, capacity, D]`, allocated with np.zeros
(pages are only backed when written, so a cache sized for the full context costs what is used).
Slots are filled left to right, one per step, for every row at once; `valid` marks slots a row
may attend to (left padding is invalid) and `next_pos` is each row's next position id, so a
padded row counts positions from its first real token, as Hugging Face's generate does.
"""

from __future__ import annotations

import numpy as np

from .config import Config
from .errors import GptcpuError

KV_DTYPES = {"f32": np.float32, "f16": np.int16}   # f16: IEEE half bits, converted by the kernels


def kv_dtype(name: str):
    """A KV cache dtype's name -> the NumPy dtype its arrays hold."""
    if name not in KV_DTYPES:
        raise GptcpuError(f"unknown KV cache dtype {name!r}; use {' or '.join(KV_DTYPES)}")
    return KV_DTYPES[name]


class KVCache:
    def __init__(self, config: Config, batch: int, capacity: int):
        L, H, D = config.n_layer, config.n_head, config.head_dim
        self.capacity = capacity
        self.k = np.zeros((L, batch, H, capacity, D), np.float32)
        self.v = np.zeros((L, batch, H, capacity, D), np.float32)
        self.valid = np.zeros((batch, capacity), bool)   # may be attended to
        self.next_pos = np.zeros(batch, np.int64)        # position id of each row's next token
        self.length = 0                                  # slots filled, the same for every row

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def padded(self) -> bool:
        return not self.valid[:, :self.length].all()

    def append(self, mask: np.ndarray) -> np.ndarray:
        """Claim the next T slots for tokens whose validity is mask [B, T] -> their positions [B, T]."""
        T = mask.shape[1]
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {T} > {self.capacity} slots")
        self.valid[:, self.length:self.length + T] = mask
        pos = self.next_pos[:, None] + np.cumsum(mask, axis=1) - 1
        self.next_pos += mask.sum(axis=1)
        return np.maximum(pos, 0)

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write this step's k, v [B, H, T, D] into the slots `append` claimed -> all keys and
        values so far, [B, H, S, D] views (S = slots filled including these)."""
        t0, T = self.length, k.shape[2]
        self.k[layer, :, :, t0:t0 + T] = k
        self.v[layer, :, :, t0:t0 + T] = v
        return self.k[layer, :, :, :t0 + T], self.v[layer, :, :, :t0 + T]

    def advance(self, T: int) -> None:
        """Every layer has written its T new slots."""
        self.length += T


class SlotCache:
    """The KV cache of a continuous batch: one row (slot) per member, each with its own length.

    Keys and values are `[L, slots, H, capacity, D]` (np.zeros: a slot's pages are backed only
    as far as it has written, and reused by the next member), float32, or f16 as int16 bits
    (dtype "f16": half the memory and half the bytes each decode step reads; the kernels
    convert in registers, engine.kernels.store). A decode step attends for every
    decoding member at once over the slots `0:hi`, each masked to its own length; a prompt chunk
    attends over its own slot. Free slots are handed out lowest first, which keeps `hi` small.
    """

    def __init__(self, config: Config, slots: int, capacity: int, dtype: str = "f32"):
        L, H, D = config.n_layer, config.n_head, config.head_dim
        self.capacity, self.dtype = capacity, dtype
        self.k = np.zeros((L, slots, H, capacity, D), kv_dtype(dtype))
        self.v = np.zeros((L, slots, H, capacity, D), kv_dtype(dtype))
        self.length = np.zeros(slots, np.int64)
        self.free = list(range(slots))

    def acquire(self) -> int:
        if not self.free:
            raise ValueError("no free slot in the KV cache")
        self.free.sort()
        slot = self.free.pop(0)
        self.length[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.length[slot] = 0
        self.free.append(slot)
