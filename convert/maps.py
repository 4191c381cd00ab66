"""Weight maps: one entry per Hugging Face `model_type`, from its names and layout to ours.

The gptcpu layout (DESIGN.md, "The model folder"): every linear weight is stored `[in, out]`
so the engine computes `x @ w + b`; GPT-J's parallel block is fused at convert time into two
GEMMs, `ln_1(x) @ [Wq|Wk|Wv|W_in]` and `[attn | gelu(h)] @ [Wo ; W_out]`. All transposes happen
here, once. GPT-2's Conv1D is already `[in, out]`; torch's Linear (GPT-J, lm_head) is `[out, in]`.

Source names are matched after dropping a leading "transformer." (GPT-2's original files have
none). Buffers such as `attn.bias` (the causal mask) are dropped; any other name is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gptcpu.engine.config import Config
from gptcpu.engine.errors import GptcpuError


@dataclass(frozen=True)
class Piece:
    src: str | None          # source tensor name, or None for zeros (GPT-J's q/k/v have no bias)
    shape: tuple[int, ...]   # its shape in the source checkpoint


@dataclass(frozen=True)
class Out:
    name: str                # canonical name in model.safetensors
    pieces: tuple[Piece, ...]
    linear: bool = False     # pieces are torch Linear weights [out, in]: transpose to [in, out]
    axis: int = 0            # concatenate the (transposed) pieces along this axis
    is_weight: bool = True   # weight matrices take the model dtype; norms and biases stay f32

    @property
    def per_row(self) -> bool:
        """Embedding tables ([rows, C]: a token's or a position's vector) have one output channel
        per row (the tied LM head reads wte's rows); every other matrix is [in, out]."""
        return self.name in ("wte", "wpe")

    @property
    def channels(self) -> int:
        """Output channels: q8 keeps one f32 scale for each."""
        return self.shape[0] if self.per_row else self.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        shapes = [p.shape[::-1] if self.linear else p.shape for p in self.pieces]
        out = list(shapes[0])
        out[self.axis] = sum(s[self.axis] for s in shapes)
        return tuple(out)


def _norm(name: str, src: str, n: int) -> list[Out]:
    return [Out(f"{name}.weight", (Piece(f"{src}.weight", (n,)),), is_weight=False),
            Out(f"{name}.bias", (Piece(f"{src}.bias", (n,)),), is_weight=False)]


def _vector(name: str, *pieces: Piece) -> Out:
    return Out(name, tuple(pieces), is_weight=False)


def gpt2_outputs(c: Config) -> list[Out]:
    C, I, V = c.n_embd, c.n_inner, c.n_vocab
    outs = [Out("wte", (Piece("wte.weight", (V, C)),)),
            Out("wpe", (Piece("wpe.weight", (c.n_ctx, C)),))]
    for i in range(c.n_layer):
        h, b = f"h.{i}", f"blocks.{i}"
        outs += _norm(f"{b}.ln_1", f"{h}.ln_1", C)
        outs += [Out(f"{b}.attn.w_qkv", (Piece(f"{h}.attn.c_attn.weight", (C, 3 * C)),)),
                 _vector(f"{b}.attn.b_qkv", Piece(f"{h}.attn.c_attn.bias", (3 * C,))),
                 Out(f"{b}.attn.w_o", (Piece(f"{h}.attn.c_proj.weight", (C, C)),)),
                 _vector(f"{b}.attn.b_o", Piece(f"{h}.attn.c_proj.bias", (C,)))]
        outs += _norm(f"{b}.ln_2", f"{h}.ln_2", C)
        outs += [Out(f"{b}.mlp.w_in", (Piece(f"{h}.mlp.c_fc.weight", (C, I)),)),
                 _vector(f"{b}.mlp.b_in", Piece(f"{h}.mlp.c_fc.bias", (I,))),
                 Out(f"{b}.mlp.w_out", (Piece(f"{h}.mlp.c_proj.weight", (I, C)),)),
                 _vector(f"{b}.mlp.b_out", Piece(f"{h}.mlp.c_proj.bias", (C,)))]
    outs += _norm("ln_f", "ln_f", C)
    if not c.tied_head:
        outs.append(Out("lm_head.weight", (Piece("lm_head.weight", (V, C)),), linear=True))
    return outs


def gptj_outputs(c: Config) -> list[Out]:
    C, I, V = c.n_embd, c.n_inner, c.n_vocab
    outs = [Out("wte", (Piece("wte.weight", (V, C)),))]
    for i in range(c.n_layer):
        h, b = f"h.{i}", f"blocks.{i}"
        outs += _norm(f"{b}.ln_1", f"{h}.ln_1", C)
        # One GEMM for everything that reads ln_1(x): [C, 3C + I]
        outs.append(Out(f"{b}.w_in", (Piece(f"{h}.attn.q_proj.weight", (C, C)),
                                      Piece(f"{h}.attn.k_proj.weight", (C, C)),
                                      Piece(f"{h}.attn.v_proj.weight", (C, C)),
                                      Piece(f"{h}.mlp.fc_in.weight", (I, C))), linear=True, axis=1))
        outs.append(_vector(f"{b}.b_in", Piece(None, (3 * C,)), Piece(f"{h}.mlp.fc_in.bias", (I,))))
        # One GEMM for both outputs: [attn | gelu(h)] @ [Wo ; W_out], [C + I, C]
        outs.append(Out(f"{b}.w_out", (Piece(f"{h}.attn.out_proj.weight", (C, C)),
                                       Piece(f"{h}.mlp.fc_out.weight", (C, I))), linear=True, axis=0))
        outs.append(_vector(f"{b}.b_out", Piece(f"{h}.mlp.fc_out.bias", (C,))))
    outs += _norm("ln_f", "ln_f", C)
    outs.append(Out("lm_head.weight", (Piece("lm_head.weight", (V, C)),), linear=True))
    outs.append(_vector("lm_head.bias", Piece("lm_head.bias", (V,))))
    return outs


def _config_gpt2(hf: dict, dtype: str) -> Config:
    n_embd = hf.get("n_embd", 768)
    if hf.get("add_cross_attention"):
        raise GptcpuError("GPT-2 with cross-attention (an encoder-decoder) is not supported")
    return Config(
        arch="gpt2", n_vocab=hf.get("vocab_size", 50257), n_ctx=hf.get("n_positions", 1024),
        n_embd=n_embd, n_head=hf.get("n_head", 12), n_layer=hf.get("n_layer", 12),
        n_inner=hf.get("n_inner") or 4 * n_embd,
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        activation=hf.get("activation_function", "gelu_new"),
        tied_head=hf.get("tie_word_embeddings", True),
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        bos_token_id=hf.get("bos_token_id", 50256), eos_token_id=hf.get("eos_token_id", 50256),
        dtype=dtype)


def _config_gptj(hf: dict, dtype: str) -> Config:
    n_embd, n_head = hf.get("n_embd", 4096), hf.get("n_head", 16)
    return Config(
        arch="gptj", n_vocab=hf.get("vocab_size", 50400), n_ctx=hf.get("n_positions", 2048),
        n_embd=n_embd, n_head=n_head, n_layer=hf.get("n_layer", 28),
        n_inner=hf.get("n_inner") or 4 * n_embd,
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        activation=hf.get("activation_function", "gelu_new"),
        # rotary_dim unset means the whole head rotates (as in the original mesh-transformer-jax)
        rotary_dim=hf.get("rotary_dim") or n_embd // n_head,
        parallel_residual=True, tied_head=False, head_bias=True,
        bos_token_id=hf.get("bos_token_id", 50256), eos_token_id=hf.get("eos_token_id", 50256),
        dtype=dtype)


@dataclass(frozen=True)
class Arch:
    config: callable          # HF config.json dict, dtype -> Config
    outputs: callable         # Config -> [Out], in file order
    ignored: tuple[str, ...]  # regexes of source names to drop (buffers, the tied head)


ARCHS = {
    "gpt2": Arch(_config_gpt2, gpt2_outputs,
                 (r"h\.\d+\.attn\.(masked_)?bias", r"h\.\d+\.crossattention\..*")),
    "gptj": Arch(_config_gptj, gptj_outputs, (r"h\.\d+\.attn\.(masked_)?bias",)),
}


def arch_for(hf_config: dict) -> Arch:
    model_type = hf_config.get("model_type")
    if model_type not in ARCHS:
        raise GptcpuError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]


def canonical_source_name(name: str) -> str:
    return name[len("transformer."):] if name.startswith("transformer.") else name


def plan(hf_config: dict, dtype: str, source_names: set[str]) -> tuple[Config, list[Out]]:
    """Check the source's names against the map: -> (our config, outputs). Raises on any mismatch."""
    arch = arch_for(hf_config)
    config = arch.config(hf_config, dtype)
    outputs = arch.outputs(config)
    used = {p.src for o in outputs for p in o.pieces if p.src}
    missing = sorted(used - source_names)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GptcpuError(f"checkpoint lacks tensor {missing[0]}{more}")
    ignored = re.compile("|".join(arch.ignored))
    extra = sorted(n for n in source_names - used
                   if not ignored.fullmatch(n) and not (config.tied_head and n == "lm_head.weight"))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise GptcpuError(f"unexpected tensor {extra[0]} in checkpoint{more}")
    return config, outputs
