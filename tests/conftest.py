"""Shared fixtures: a real GPT-2 tokenizer, tiny random checkpoints in real layouts, converted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import checkpoints

# name -> (real config, overrides): the shapes every engine test runs on
SHAPES = {
    # GPT-2: head_dim 12 (not a power of two), n_inner unset (4C), the real 50,257 vocab
    "gpt2": ("gpt2", dict(n_embd=48, n_head=4, n_layer=2, n_positions=64)),
    # GPT-2 variant: odd vocab, explicit n_inner, untied head, scores scaled by 1/(layer+1)
    "gpt2-untied": ("gpt2", dict(n_embd=40, n_head=5, n_layer=3, n_positions=48, vocab_size=1001, n_inner=72,
                                 tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True)),
    # GPT-J: rotary_dim 8 < head_dim 12, n_inner unset, the real padded 50,400 vocab
    "gptj": ("gpt-j-6b", dict(n_embd=48, n_head=4, n_layer=2, n_positions=64, rotary_dim=8)),
    # the other activations a config may name: exact (erf) GELU, ReLU
    "gpt2-gelu": ("gpt2", dict(n_embd=32, n_head=4, n_layer=2, n_positions=48, vocab_size=301,
                               activation_function="gelu")),
    "gptj-relu": ("gpt-j-6b", dict(n_embd=32, n_head=2, n_layer=2, n_positions=48, rotary_dim=4,
                                   vocab_size=299, activation_function="relu")),
    # GPT-J variant: odd vocab, rotary over the whole head (rotary_dim = head_dim 10), n_inner set
    "gptj-odd": ("gpt-j-6b", dict(n_embd=30, n_head=3, n_layer=3, n_positions=40, rotary_dim=10,
                                  vocab_size=997, n_inner=50)),
}
# GPT-2-small's width in one layer: BLAS's sgemm changes a row's last bits with the rows beside
# it at this width (not at the tiny ones), which the batch-invariance test needs to see
WIDE_SHAPES = {"gpt2-wide": ("gpt2", dict(n_embd=768, n_head=12, n_layer=1, n_positions=128, vocab_size=2003))}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gptcpu")


@pytest.fixture(scope="session")
def tokenizer_files(workdir) -> Path:
    """The GPT-2 tokenizer as a hub folder holds it: vocab.json, merges.txt, tokenizer.json, ..."""
    slow, hf = workdir / "tokenizer-slow", workdir / "tokenizer-hf"
    checkpoints.write_gpt2_tokenizer_files(slow)
    checkpoints.write_hf_tokenizer(hf, slow)
    return hf


class Factory:
    """Builds (once) and caches HF models, their checkpoints and their conversions."""

    def __init__(self, root: Path, tokenizer: Path):
        self.root, self.tokenizer = root, tokenizer
        self._models, self._done = {}, {}

    def hf_model(self, shape: str):
        if shape not in self._models:
            base, overrides = (SHAPES | WIDE_SHAPES)[shape]
            self._models[shape] = checkpoints.build_model(checkpoints.real_config(base, **overrides))
        return self._models[shape]

    def checkpoint(self, shape: str, layout: str = "safetensors") -> Path:
        key = ("ckpt", shape, layout)
        if key not in self._done:
            folder = self.root / f"hf-{shape}-{layout}"
            shutil.rmtree(folder, ignore_errors=True)
            self._done[key] = checkpoints.save_checkpoint(self.hf_model(shape), folder, layout, self.tokenizer)
        return self._done[key]

    def converted(self, shape: str, dtype: str = "f32", layout: str = "safetensors") -> Path:
        key = ("out", shape, dtype, layout)
        if key not in self._done:
            import gptcpu
            self._done[key] = gptcpu.convert(str(self.checkpoint(shape, layout)),
                                             self.root / f"gptcpu-{shape}-{dtype}-{layout}", dtype=dtype)
        return self._done[key]


@pytest.fixture(scope="session")
def factory(workdir, tokenizer_files) -> Factory:
    return Factory(workdir, tokenizer_files)


@pytest.fixture(scope="session")
def demo_f32(tmp_path_factory) -> Path:
    """The embedded demo model (a trained GPT-2), converted to f32 once for the session."""
    import gptcpu
    return gptcpu.convert(str(checkpoints.ROOT / "engine" / "demo"), tmp_path_factory.mktemp("demo") / "demo-f32",
                          dtype="f32", progress=False)


@pytest.fixture(scope="session")
def demo_engine(demo_f32):
    import gptcpu
    return gptcpu.load(demo_f32, threads=1)
