"""Peak memory of `gptcpu convert` on a GPT-J with GPT-J-6B's width, from a sharded .bin.

    python -m gptcpu.bench.convert_memory [--layers 4] [--dtype f16] [--work /tmp/gptcpu-convert-mem]

Writes a random checkpoint shaped like EleutherAI/gpt-j-6b (n_embd 4096, 16 heads, rotary_dim 64,
vocab 50,400) with `--layers` blocks, in the main revision's quirks (Linear weights stored as
transposed views, one `attn.bias` buffer shared by every layer), one shard per block plus one for
the embeddings and head; then converts it in a child process and reports the child's peak RSS
against the issue's bound: twice the largest output tensor plus 500 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "tests" / "configs" / "gpt-j-6b.json"


def write_checkpoint(folder: Path, n_layer: int) -> int:
    import torch

    cfg = json.loads(CONFIG.read_text())
    cfg["n_layer"] = n_layer
    C, V, n = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def linear(out_f, in_f):  # stored [in, out], exposed as the transposed [out, in] view
        return (torch.randn(in_f, out_f, generator=g) * 0.02).t()

    mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
    shards = [{"transformer.wte.weight": torch.randn(V, C, generator=g) * 0.02,
               "transformer.ln_f.weight": torch.ones(C), "transformer.ln_f.bias": torch.zeros(C),
               "lm_head.weight": linear(V, C), "lm_head.bias": torch.zeros(V)}]
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        shards.append({h + "ln_1.weight": torch.ones(C), h + "ln_1.bias": torch.zeros(C),
                       h + "attn.bias": mask, h + "attn.masked_bias": torch.tensor(-1e9),
                       **{h + f"attn.{p}_proj.weight": linear(C, C) for p in ("q", "k", "v", "out")},
                       h + "mlp.fc_in.weight": linear(4 * C, C), h + "mlp.fc_in.bias": torch.zeros(4 * C),
                       h + "mlp.fc_out.weight": linear(C, 4 * C), h + "mlp.fc_out.bias": torch.zeros(C)})
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = f"pytorch_model-{k:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
        total += (folder / name).stat().st_size
        del shard
    shards.clear()
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_byte_tokenizer(folder)
    return total


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer.json with no merges (the convert path needs one; its content is moot)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))


def peak_rss(proc: subprocess.Popen) -> int:
    """The child's VmHWM (peak RSS of its own address space, reset at exec: unlike ru_maxrss,
    which a forked child inherits from its parent) read until it exits -> bytes."""
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return peak


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptcpu-convert-mem"))
    args = ap.parse_args(argv)
    src, out = args.work / f"src-{args.layers}", args.work / f"out-{args.layers}-{args.dtype}"
    if not (src / "tokenizer.json").exists():
        t = time.time()
        size = write_checkpoint(src, args.layers)
        print(f"wrote {size / 1e9:.2f} GB of shards in {time.time() - t:.0f} s", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "gptcpu.engine.cli", "convert", str(src), "--out", str(out),
                             "--dtype", args.dtype, "--quiet"], stdout=subprocess.DEVNULL)
    peak = peak_rss(proc)
    if proc.returncode:
        sys.exit(f"convert failed with status {proc.returncode}")
    from gptcpu.engine.info import account, config_of
    from gptcpu.convert.maps import ARCHS
    from gptcpu.engine.config import Config

    c = Config.load(out)
    item = {"f32": 4, "f16": 2, "bf16": 2, "q8": 1}[args.dtype]
    largest = max(int(__import__("numpy").prod(o.shape)) * (item if o.is_weight else 4)
                  for o in ARCHS[c.arch].outputs(c))
    bound = 2 * largest + 500e6
    src_bytes = sum(f.stat().st_size for f in src.glob("*.bin"))
    print(json.dumps({"layers": args.layers, "dtype": args.dtype, "source_gb": round(src_bytes / 1e9, 2),
                      "output_gb": round((out / "model.safetensors").stat().st_size / 1e9, 2),
                      "seconds": round(time.time() - t, 1), "peak_rss_gb": round(peak / 1e9, 2),
                      "largest_output_tensor_gb": round(largest / 1e9, 3), "bound_gb": round(bound / 1e9, 2),
                      "within_bound": peak < bound,
                      "params": account(config_of(str(out)))["params"]["total"]}))


if __name__ == "__main__":
    main()
