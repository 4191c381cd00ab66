"""Tiny Hugging Face checkpoints with random weights, built from real configs, in real file layouts.

Model hubs are out of reach, so tests make their own: a `transformers` model from GPT-2's or
GPT-J-6B's real config with small sizes, saved the way real checkpoints are saved (safetensors,
sharded safetensors, sharded .bin, GPT-2's original key names, GPT-J's JAX-export layout with
transposed weight views and one shared `attn.bias`), with a real GPT-2 tokenizer made from
`../shared/assets/gpt2.tiktoken`.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIKTOKEN = ROOT.parent / "shared" / "assets" / "gpt2.tiktoken"
CONFIGS = Path(__file__).parent / "configs"
LAYOUTS = ("safetensors", "sharded-safetensors", "sharded-bin", "original-bin", "jax-export-bin")


def real_config(name: str, **overrides) -> dict:
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    cfg.update(overrides)
    return cfg


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (as in openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run BPE on token's bytes with only the merges ranked below max_rank: the last merge's halves."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[1]):
                best = (i, r)
        if best is None:
            return parts
        i = best[0]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def write_gpt2_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt (the slow tokenizer's files) from the tiktoken ranks."""
    if not TIKTOKEN.exists():
        pytest.skip(f"needs the GPT-2 BPE ranks at {TIKTOKEN} (../shared/assets)")
    ranks = {}
    for line in TIKTOKEN.read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    enc = _bytes_to_unicode()
    text = lambda b: "".join(enc[x] for x in b)  # noqa: E731
    vocab = {text(t): r for t, r in ranks.items()}
    vocab["<|endoftext|>"] = len(ranks)
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _split(ranks, tok, rank)
            merges.append(f"{text(left)} {text(right)}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_hf_tokenizer(folder: Path, slow_files: Path) -> None:
    """What a hub GPT-2 folder holds: the slow files plus tokenizer.json, as transformers writes them."""
    from transformers import GPT2TokenizerFast

    import transformers

    files = (str(slow_files / "vocab.json"), str(slow_files / "merges.txt"))
    if int(transformers.__version__.split(".")[0]) >= 5:
        tok = GPT2TokenizerFast(vocab=files[0], merges=files[1])
    else:
        tok = GPT2TokenizerFast(vocab_file=files[0], merges_file=files[1])
    assert tok("Hello world")["input_ids"] == [15496, 995]
    tok.save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(slow_files / name, folder / name)


def build_model(hf_config: dict, seed: int = 0):
    """A transformers model from the config, every parameter random (norms near 1, not exactly)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM

    kind = hf_config["model_type"]
    cfg_cls, model_cls = {"gpt2": (GPT2Config, GPT2LMHeadModel), "gptj": (GPTJConfig, GPTJForCausalLM)}[kind]
    config = cfg_cls(**{k: v for k, v in hf_config.items() if k != "model_type"})
    config.attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1 + 0.1 * noise if ".ln_" in name and name.endswith("weight") else 0.1 * noise)
    return model


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_checkpoint(model, folder: Path, layout: str, tokenizer: Path | None) -> Path:
    """Save model in one of LAYOUTS, with the tokenizer files from `tokenizer`."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(folder))
    if layout == "safetensors":
        model.save_pretrained(str(folder))
    elif layout == "sharded-safetensors":
        model.save_pretrained(str(folder), max_shard_size="300KB")
        assert (folder / "model.safetensors.index.json").exists()
    elif layout == "sharded-bin":
        state = _state(model)
        names = list(state)
        shards = [names[i::3] for i in range(3)]
        weight_map = {}
        for i, part in enumerate(shards, 1):
            file = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
            torch.save({k: state[k] for k in part}, folder / file)
            weight_map.update({k: file for k in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif layout == "original-bin":  # GPT-2 as OpenAI's port: no "transformer." prefix, no lm_head
        state = {k.removeprefix("transformer."): v for k, v in _state(model).items() if not k.startswith("lm_head")}
        n = model.config.n_positions
        for i in range(model.config.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, folder / "pytorch_model.bin")
    elif layout == "jax-export-bin":  # GPT-J's main revision: transposed Linear views, one shared mask
        state = _state(model)
        n = model.config.n_positions
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        for k, v in list(state.items()):
            if v.ndim == 2 and not k.endswith("wte.weight"):
                state[k] = v.t().contiguous().t()  # same values, column-major storage
                assert not state[k].is_contiguous()
        for i in range(model.config.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = mask
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
        torch.save(state, folder / "pytorch_model.bin")
    else:
        raise ValueError(layout)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copyfile(f, folder / f.name)
    return folder
