"""Where a checkpoint comes from (a hub id or a local folder) and how its tensors are read.

Weights come from `model.safetensors`, sharded safetensors with their index, `pytorch_model.bin`
or sharded `.bin` with its index. Tensors are read one at a time through mmap, in whatever
layout the file has (old checkpoints store transposed, non-contiguous views; we read strides,
never assume contiguity), and their pages are released after use so memory stays bounded.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import warnings
from pathlib import Path

import numpy as np

from gptcpu.engine.errors import GptcpuError
from gptcpu.engine.weights import bf16_to_f32, mmap_tensor, read_header

from .maps import canonical_source_name

WEIGHT_LAYOUTS = [  # in order of preference: (single file, index of shards)
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
]
TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                   "chat_template.jinja"]


def pick_weight_files(files: list[str]) -> list[str]:
    """The files to read from a listing of the checkpoint folder (safetensors preferred)."""
    names = set(files)
    for single, index in WEIGHT_LAYOUTS:
        if single in names:
            return [single]
        if index in names:
            return [index]
    raise GptcpuError("no weights found: expected model.safetensors, pytorch_model.bin "
                      "or a sharded index of either")


def resolve(source: str, revision: str | None = None) -> tuple[Path, dict]:
    """-> (a local folder holding the checkpoint, a record of where it came from)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, {"path": str(path.resolve())}
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise GptcpuError(f"{source} is not a folder or a hub id (org/name)")
    return _download(source, revision)


def _download(repo_id: str, revision: str | None) -> tuple[Path, dict]:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=False)
        files = [s.rfilename for s in info.siblings or []]
        weights = pick_weight_files(files)
        patterns = ["config.json", *TOKENIZER_FILES, *weights]
        if weights[0].endswith(".index.json"):
            patterns.append(weights[0].replace(".index.json", "-*"))
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns)
    except RepositoryNotFoundError:
        raise GptcpuError(f"{repo_id}: no such model on the hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise GptcpuError(f"{repo_id}: no revision {revision!r}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptcpuError(f"cannot download {repo_id}: {first}") from None
    return Path(folder), {"hub_id": repo_id, "revision": revision or "main", "commit": info.sha}


def read_hf_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise GptcpuError(f"{folder} has no config.json: is it a Hugging Face checkpoint?") from None
    except ValueError as e:
        raise GptcpuError(f"{folder}/config.json is not valid JSON: {e}") from None


def _shards(folder: Path, first: str) -> list[Path]:
    if not first.endswith(".index.json"):
        return [folder / first]
    try:
        weight_map = json.loads((folder / first).read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise GptcpuError(f"cannot read the shard index {folder / first}: {e}") from None
    return [folder / f for f in dict.fromkeys(weight_map.values())]


def open_weights(folder: Path) -> "SafetensorsSource | TorchSource":
    files = [p.name for p in folder.iterdir()]
    (first,) = pick_weight_files(files)
    shards = _shards(folder, first)
    for s in shards:
        if not s.exists():
            raise GptcpuError(f"shard {s.name} listed in {first} is missing")
    return SafetensorsSource(shards) if first.startswith("model.safetensors") else TorchSource(shards)


class SafetensorsSource:
    """Tensors of one or more safetensors files, each read through its own short-lived mmap."""

    def __init__(self, shards: list[Path]):
        self.files = [s.name for s in shards]
        self._where: dict[str, tuple[Path, str, dict, int]] = {}
        for path in shards:
            header, start = read_header(path)
            for key in header:
                self._where[canonical_source_name(key)] = (path, key, header, start)
        self.names = set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        _, key, header, _ = self._where[name]
        return tuple(header[key]["shape"])

    def get(self, name: str) -> np.ndarray:
        path, key, header, start = self._where[name]
        a = mmap_tensor(path, key, header, start)
        return bf16_to_f32(a) if header[key]["dtype"] == "BF16" else a

    def release(self, name: str) -> None:
        pass  # the mmap closes when the array is dropped


class TorchSource:
    """Tensors of pytorch_model.bin files, loaded with mmap=True, weights_only=True."""

    def __init__(self, shards: list[Path]):
        try:
            import torch
        except ImportError:
            raise GptcpuError("reading pytorch_model.bin needs torch: pip install 'gptcpu[torch]'") from None
        self._torch = torch
        self.files = [s.name for s in shards]
        self._state: dict[str, "torch.Tensor"] = {}
        self._mapped: set[str] = set()  # names whose storage is a file mmap (safe to drop pages)
        for path in shards:
            state, mapped = self._load(path)
            for key, t in state.items():
                if isinstance(t, torch.Tensor):
                    self._state[canonical_source_name(key)] = t
                    if mapped:
                        self._mapped.add(canonical_source_name(key))
        self.names = set(self._state)

    def _load(self, path: Path) -> tuple[dict, bool]:
        """-> (the state dict, whether its storages are a file mmap)."""
        torch = self._torch

        def fail(e: Exception) -> GptcpuError:
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            return GptcpuError(f"cannot read {path.name}: {first}")

        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True), True
        except RuntimeError as e:
            if "zipfile" not in str(e) and "mmap" not in str(e):
                raise fail(e) from None
        except Exception as e:  # pickle errors, truncated files, ...
            raise fail(e) from None
        # A pre-1.6 torch file (not a zip archive) cannot be memory-mapped: read it whole.
        warnings.warn(f"{path.name} is in torch's legacy format: it is read into memory whole")
        try:
            return torch.load(path, map_location="cpu", weights_only=True), False
        except Exception as e:
            raise fail(e) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> np.ndarray:
        t = self._state[name]
        if t.dtype == self._torch.bfloat16:
            return bf16_to_f32(t.view(self._torch.int16).numpy().view(np.uint16))
        return t.numpy()  # a strided view of the mmap: transposed layouts stay as they are

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (the mmap stays; the file is not touched)."""
        if name not in self._mapped:
            return  # read into memory: dropping its pages would lose the data
        storage = self._state[name].untyped_storage()
        _madvise_dontneed(storage.data_ptr(), storage.nbytes())


_libc = None


def _madvise_dontneed(addr: int, length: int) -> None:
    global _libc
    if length < mmap.PAGESIZE or not hasattr(os, "sysconf"):
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    start = -(-addr // page) * page          # whole pages inside the range only
    end = (addr + length) // page * page
    if end > start:
        _libc.madvise(start, end - start, 4)  # MADV_DONTNEED; pages re-read from the file if needed
