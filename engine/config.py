"""The model configuration: one frozen dataclass, read from a gptcpu model folder's config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GptcpuError

FORMAT = "gptcpu/1"
ARCHS = ("gpt2", "gptj")
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")
DTYPES = ("f32", "f16", "bf16", "q8")


@dataclass(frozen=True)
class Config:
    arch: str                        # "gpt2" | "gptj"
    n_vocab: int                     # rows of the embedding (GPT-J pads 50,257 tokens to 50,400)
    n_ctx: int                       # max positions = KV cache capacity
    n_embd: int                      # residual stream width C
    n_head: int                      # attention heads H; head_dim = C / H
    n_layer: int                     # transformer blocks L
    n_inner: int                     # MLP hidden width (4C unless the checkpoint says otherwise)
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"     # MLP non-linearity, by its Hugging Face name
    rotary_dim: int = 0              # GPT-J: rotate the first rotary_dim dims of each head (0 = none)
    parallel_residual: bool = False  # GPT-J: attention and MLP both read ln_1(x), one residual add
    tied_head: bool = True           # GPT-2: logits = x @ wte.T; otherwise a stored lm_head
    head_bias: bool = False          # GPT-J: the LM head has a bias
    scale_attn_by_inverse_layer_idx: bool = False  # GPT-2 option: scores also / (layer + 1)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "f32"               # storage dtype of the weight matrices (norms, biases: f32)
    source: dict = field(default_factory=dict, compare=False)  # where convert read it from

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise GptcpuError(f"unsupported arch {self.arch!r}; supported: {', '.join(ARCHS)}")
        if self.n_embd % self.n_head:
            raise GptcpuError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise GptcpuError(f"rotary_dim {self.rotary_dim} must be even and at most head_dim {self.head_dim}")
        if self.activation not in ACTIVATIONS:
            raise GptcpuError(f"unsupported activation {self.activation!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.dtype not in DTYPES:
            raise GptcpuError(f"unsupported dtype {self.dtype!r}; supported: {', '.join(DTYPES)}")

    def to_json(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "Config":
        if d.get("format") != FORMAT:
            raise GptcpuError(f"config.json has format {d.get('format')!r}, expected {FORMAT!r}; "
                              "convert the checkpoint with `gptcpu convert`")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, folder: str | Path) -> "Config":
        path = Path(folder) / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise GptcpuError(f"{folder} is not a gptcpu model folder: no config.json") from None
        except (OSError, ValueError) as e:
            raise GptcpuError(f"cannot read {path}: {e}") from None
        return cls.from_json(d)
