"""`gptcpu info`: what a model costs, from its config alone.

Parameters per component, bytes per storage dtype, FLOPs per token, KV-cache bytes per token and
the decode roofline (a decode step reads every weight once: tokens/s <= bandwidth / bytes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import FORMAT, Config
from .errors import GptcpuError

BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8": 1}
COMPONENTS = ("embeddings", "attention", "mlp", "norms", "lm_head")


def config_of(model: str) -> Config:
    """A Config from a gptcpu folder, a Hugging Face folder or a hub id (only config.json is read)."""
    from gptcpu.convert.maps import arch_for

    path = Path(model).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.exists():
            raise GptcpuError(f"{path} has no config.json")
    elif path.is_file() and path.suffix == ".json":
        file = path
    elif model.count("/") <= 1 and not model.startswith((".", "/", "~")):  # a hub id: gpt2, org/name
        try:
            from huggingface_hub import hf_hub_download
            file = Path(hf_hub_download(model, "config.json"))
        except Exception as e:
            raise GptcpuError(f"cannot fetch {model}/config.json: {str(e).strip().splitlines()[0]}") from None
    else:
        raise GptcpuError(f"{model} is not a folder, a config.json or a hub id")
    try:
        d = json.loads(file.read_text())
    except ValueError as e:
        raise GptcpuError(f"{file} is not valid JSON: {e}") from None
    return Config.from_json(d) if d.get("format") == FORMAT else arch_for(d).config(d, "f32")


def _component(src: str) -> str:
    if src.startswith(("wte", "wpe")):
        return "embeddings"
    if src.startswith("lm_head"):
        return "lm_head"
    if ".ln_" in src or src.startswith("ln_f"):
        return "norms"
    return "attention" if ".attn." in src else "mlp"


def account(c: Config, bandwidth_gbps: float = 30.0, ram_bytes: int | None = None) -> dict:
    """Everything `gptcpu info` prints, as a dict (the --json output)."""
    from gptcpu.convert.maps import ARCHS

    params = dict.fromkeys(COMPONENTS, 0)
    per_layer = {"attention": 0, "mlp": 0, "norms": 0}
    matrices, vectors, streamed = 0, 0, 0  # weight elements at the dtype; f32 elements; read per token
    out_channels = 0                        # q8: one f32 scale per output channel
    for o in ARCHS[c.arch].outputs(c):
        n = 1
        for d in o.shape:
            n *= d
        for p in o.pieces:
            if p.src is not None:
                k = 1
                for d in p.shape:
                    k *= d
                params[_component(p.src)] += k
                if p.src.startswith("h.0."):
                    per_layer[_component(p.src)] += k
        if o.is_weight:
            matrices += n
            out_channels += o.channels
            if o.name not in ("wte", "wpe") or (o.name == "wte" and c.tied_head):
                streamed += n   # the embedding tables are gathered from, except a tied head
        else:
            vectors += n
    total = sum(params.values())
    L, C = c.n_layer, c.n_embd
    weight_bytes = {dt: matrices * b + vectors * 4 + (out_channels * 4 if dt == "q8" else 0)
                    for dt, b in BYTES.items()}
    read_bytes = {dt: streamed * b + vectors * 4 + (out_channels * 4 if dt == "q8" else 0)
                  for dt, b in BYTES.items()}
    kv_per_token = {dt: 2 * L * C * BYTES[dt] for dt in ("f32", "f16")}
    if ram_bytes is None:
        ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "arch": c.arch, "n_layer": L, "n_embd": C, "n_head": c.n_head, "n_inner": c.n_inner,
        "n_vocab": c.n_vocab, "n_ctx": c.n_ctx,
        "params": {**params, "total": total}, "params_per_layer": per_layer,
        "weight_bytes": weight_bytes,
        "flops_per_token": {"matmul": 2 * streamed, "attention_per_context_token": 4 * L * C,
                            "at_full_context": 2 * streamed + 4 * L * C * c.n_ctx},
        "kv_bytes_per_token": kv_per_token,
        "ram_bytes": ram_bytes,
        "kv_tokens_in_ram": {f"{w}+{kv}_cache": max(0, (ram_bytes - weight_bytes[w]) // kv_per_token[kv])
                             for w in ("f32", "f16", "q8") for kv in ("f32", "f16")},
        "bandwidth_gbps": bandwidth_gbps,
        "decode_bytes_per_token": read_bytes,
        "roofline_tokens_per_s": {dt: bandwidth_gbps * 1e9 / b for dt, b in read_bytes.items()},
    }


def _n(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def render(a: dict) -> str:
    p = a["params"]
    lines = [f"{a['arch']}: {a['n_layer']} layers, n_embd {a['n_embd']}, {a['n_head']} heads, "
             f"n_inner {a['n_inner']}, vocab {a['n_vocab']}, context {a['n_ctx']}",
             "", "| component | parameters | share |", "| --- | ---: | ---: |"]
    for k in COMPONENTS:
        extra = f" ({_n(a['params_per_layer'][k])} per layer)" if k in a["params_per_layer"] else ""
        lines.append(f"| {k} | {p[k]:,}{extra} | {100 * p[k] / p['total']:.1f}% |")
    lines.append(f"| total | {p['total']:,} | 100% |")
    lines += ["", "| weights | file bytes | bytes read per decode token | roofline at "
              f"{a['bandwidth_gbps']:g} GB/s |", "| --- | ---: | ---: | ---: |"]
    for dt in BYTES:
        lines.append(f"| {dt} | {_n(a['weight_bytes'][dt])}B | {_n(a['decode_bytes_per_token'][dt])}B | "
                     f"{a['roofline_tokens_per_s'][dt]:.1f} tok/s |")
    f = a["flops_per_token"]
    kv = a["kv_bytes_per_token"]
    lines += ["", f"FLOPs per token: {_n(f['matmul'])} + {_n(f['attention_per_context_token'])} per token "
                  f"of context ({_n(f['at_full_context'])} at {a['n_ctx']})",
              f"KV cache per token: {kv['f32']:,} bytes at f32, {kv['f16']:,} at f16",
              f"tokens of KV cache that fit in {_n(a['ram_bytes'])}B of RAM beside the weights: "
              + ", ".join(f"{k.replace('_cache', ' cache')} {v:,}" for k, v in a["kv_tokens_in_ram"].items())]
    return "\n".join(lines)
