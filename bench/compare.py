"""`gptcpu bench`: gptcpu vs onnxruntime vs transformers on torch CPU, same weights, one run.

    gptcpu bench SOURCE [--dtypes f32,bf16,f16,q8] [--stacks ...] [--threads 2] [--batch 1,4]
                 [--prompt 128] [--new 128] [--repeats 3] [--json FILE] [--plot FILE.png]

SOURCE is a Hugging Face folder or hub id, or one of the standard random models built from the
real configs: gpt2 (124M), gpt2-medium (355M), gptj-4l (GPT-J-6B's width, 4 layers) and, with
--full-gptj, gptj-full (all 28 layers, made in bf16). It is converted for gptcpu (each dtype)
and exported to ONNX with past key/values (bench/onnx_export.py) into --work, once.

Every cell (stack x dtype x batch size) runs in its own process (bench/stacks.py: load, greedy
prefill and decode on the same seeded prompt tokens, peak RSS), one at a time, the cells
interleaved over the repeats (in a rotated order, since these machines are noisy), and the
read bandwidth is measured in each repeat too. Reported: medians with min-max, decode against
its roofline (batch x bandwidth / bytes of weights read per step), and whether each stack's
greedy tokens equal transformers' generate at the same batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STANDARD = ["gpt2", "gpt2-medium", "gptj-4l"]
STACKS = ["gptcpu", "torch", "torch-loop", "ort", "ort-opt", "ort-int8"]
LABELS = {"torch": "transformers generate", "torch-loop": "transformers loop", "ort": "onnxruntime",
          "ort-opt": "onnxruntime optimized", "ort-int8": "onnxruntime int8"}
SPREAD = 0.25   # (max - min) / median of decode above this: too noisy to rank


@dataclass
class Cell:
    stack: str
    dtype: str        # of the weights it reads: f32, bf16, f16, q8 (onnxruntime int8 counts as q8)
    batch: int
    argv: list[str]
    label: str
    runs: list[dict] = field(default_factory=list)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("source", help="HF folder or hub id, or a standard random model: " + ", ".join(STANDARD))
    ap.add_argument("--dtypes", default="f32,bf16,f16,q8", help="gptcpu weight types (default: all four)")
    ap.add_argument("--stacks", default=",".join(STACKS), help=f"any of {','.join(STACKS)} (default: all)")
    ap.add_argument("--backend", help="gptcpu's BLAS: openblas, mkl or both (openblas,mkl); default: the one "
                    "gptcpu picks on this machine (MKL on Intel CPUs with the mkl extra, else OpenBLAS)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,4", help="batch sizes (default 1,4)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full-gptj", action="store_true",
                    help="allow SOURCE gptj-full: GPT-J-6B's 28 layers, random, built in bf16 (~12 GB)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptcpu-bench"), help="models and graphs, reused")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--plot", type=Path, help="decode tokens/s per stack, with the rooflines, as a PNG")
    ap.add_argument("--markdown", type=Path, help="also write the table here")


def prepare(args) -> tuple[Path, str, dict, dict]:
    """-> (HF folder, display name, {dtype: gptcpu folder}, {ort variant: graph path or why not})."""
    import gptcpu
    from gptcpu.bench.onnx_export import export
    from gptcpu.convert.sources import resolve
    from gptcpu.engine.errors import GptcpuError

    stacks = args.stacks.split(",")
    if args.source in STANDARD or args.source == "gptj-full":
        if args.source == "gptj-full" and not args.full_gptj:
            raise GptcpuError("gptj-full is 6B parameters (12 GB in bf16): pass --full-gptj to build it")
        hf_dir, name = build_standard(args.source, args.work), args.source
    else:
        hf_dir, _ = resolve(args.source)
        name = args.source.rstrip("/").split("/")[-1]
    n_ctx = json.loads((hf_dir / "config.json").read_text()).get("n_positions")
    if n_ctx and args.prompt + args.new > n_ctx:   # before any stack runs: every one would fail
        raise GptcpuError(f"--prompt {args.prompt} + --new {args.new} tokens do not fit {name}'s context "
                          f"of {n_ctx}")
    ours = {}
    for dt in args.dtypes.split(",") if "gptcpu" in stacks else []:
        ours[dt] = args.work / f"gptcpu-{name}-{dt}"
        if not (ours[dt] / "model.safetensors").exists():
            print(f"converting {name} to {dt} ...", file=sys.stderr)
            gptcpu.convert(str(hf_dir), ours[dt], dtype=dt, force=True, progress=False)
    graphs = {}
    if any(s.startswith("ort") for s in stacks):
        if name == "gptj-full":
            graphs = {s: "the f32 graph of GPT-J-6B (24 GB) does not fit this machine's memory" for s in stacks
                      if s.startswith("ort")}
        else:
            print(f"exporting {name} to ONNX ...", file=sys.stderr)
            graphs = export(hf_dir, args.work / f"onnx-{name}")
    return hf_dir, name, ours, graphs


def build_standard(shape: str, work: Path) -> Path:
    """A random HF checkpoint from a real config (bench.speed.build); gptj-full is built in bf16."""
    from gptcpu.bench.speed import build

    if shape != "gptj-full":
        return build(shape, work)[0]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = work / "hf-gptj-full"
    if not (folder / "config.json").exists():
        cfg = json.loads((ROOT / "tests" / "configs" / "gpt-j-6b.json").read_text())
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.bfloat16)
        model.save_pretrained(folder)
        from gptcpu.bench.convert_memory import write_byte_tokenizer
        write_byte_tokenizer(folder)
    return folder


def cells(args, hf_dir: Path, ours: dict, graphs: dict, vocab: int, torch_dtype: str) -> tuple[list[Cell], dict]:
    common = ["--threads", str(args.threads), "--prompt", str(args.prompt), "--new", str(args.new),
              "--vocab", str(vocab)]
    out, skipped = [], {}
    stacks = args.stacks.split(",")
    for b in [int(x) for x in args.batch.split(",")]:
        run = [*common, "--batch", str(b)]
        for s in stacks:
            if s == "gptcpu":
                for backend in args.backend.split(","):
                    for dt, folder in ours.items():
                        label = f"gptcpu {dt}" + (f" ({backend})" if "," in args.backend else "")
                        out.append(Cell(s, dt, b, ["gptcpu", str(folder), "--backend", backend, *run], label))
            elif s in ("torch", "torch-loop"):
                out.append(Cell(s, torch_dtype, b, [s, str(hf_dir), "--dtype", torch_dtype, *run],
                                f"{LABELS[s]} ({torch_dtype})"))
            elif isinstance(graphs.get(s), Path):
                out.append(Cell(s, "q8" if s == "ort-int8" else "f32", b, ["ort", str(graphs[s]), *run], LABELS[s]))
            elif s in graphs:
                skipped[LABELS[s]] = graphs[s]
    return out, skipped


def run_cell(argv: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "gptcpu.bench.stacks", *argv], capture_output=True, text=True)
    if r.returncode:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    return json.loads(r.stdout.strip().splitlines()[-1])


def bandwidth(threads: int) -> float:
    r = subprocess.run([sys.executable, "-m", "gptcpu.bench.run_one", "--bandwidth", "--threads", str(threads)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["read_bandwidth"]


def med(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def agreement(tokens: list[list[int]], ref: list[list[int]] | None) -> str:
    """How many leading tokens of every row equal the reference's: '128/128', or where they part."""
    if ref is None:
        return "n/a"
    n = len(ref[0])
    same = min(next((k for k, (a, b) in enumerate(zip(row, r)) if a != b), min(len(row), len(r)))
               for row, r in zip(tokens, ref))
    return f"{same}/{n}"


def summarize(name, args, all_cells, skipped, bw, bytes_per_token) -> dict:
    bandwidth_ = statistics.median(bw)
    rows = []
    ref = {c.batch: c.runs[0]["tokens"] for c in all_cells if c.stack == "torch" and c.runs and "tokens" in c.runs[0]}
    for c in all_cells:
        ok = [r for r in c.runs if "error" not in r]
        if not ok:
            rows.append({"label": c.label, "batch": c.batch, "error": c.runs[0]["error"] if c.runs else "not run"})
            continue
        roofline = c.batch * bandwidth_ / bytes_per_token[c.dtype]
        decode = med([r["decode_tok_s"] for r in ok])
        rows.append({"label": c.label, "stack": c.stack, "dtype": c.dtype, "batch": c.batch,
                     "load_s": med([r["load_s"] for r in ok]), "ttft_ms": med([1000 * r["ttft_s"] for r in ok]),
                     "prefill_tok_s": med([r["prefill_tok_s"] for r in ok]), "decode_tok_s": decode,
                     "peak_rss_mb": max(r["peak_rss"] for r in ok) / 2**20, "roofline_tok_s": roofline,
                     "of_roofline": decode["median"] / roofline,
                     "tokens_match": agreement(ok[0]["tokens"], ref.get(c.batch)),
                     "noisy": (decode["max"] - decode["min"]) / decode["median"] > SPREAD})
    return {"model": name, "threads": args.threads, "prompt": args.prompt, "new": args.new,
            "repeats": args.repeats, "read_bandwidth": med(bw), "machine": machine(), "backend": args.backend,
            "rows": rows, "skipped": skipped}


def save(out: Path, stem: str, result: dict, text: str) -> None:
    """A benchmark's results: out/STEM.json and out/STEM.md, and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)


def machine() -> str:
    import os

    from gptcpu.engine.blas import cpuinfo
    return f"{cpuinfo('model name') or 'unknown CPU'}, {os.cpu_count()} CPUs"


def render(r: dict) -> str:
    bw = r["read_bandwidth"]
    from gptcpu.engine.blas import NAMES

    lines = [f"**{r['model']}**: {r['threads']} threads, {r['prompt']}-token prompts, {r['new']} new tokens "
             f"(greedy), medians of {r['repeats']} (min-max); read bandwidth {bw['median'] / 1e9:.1f} GB/s; "
             f"{r['machine']}" + (f"; gptcpu on {NAMES.get(r['backend'], r['backend'])}"
                                  if "backend" in r and "," not in r["backend"] else ""), "",
             "| stack | batch | load s | TTFT ms | prefill tok/s | decode tok/s | of roofline | peak RSS MB "
             "| tokens = transformers |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for x in r["rows"]:
        if "error" in x:
            lines.append(f"| {x['label']} | {x['batch']} | failed: {x['error']} | | | | | | |")
            continue
        d, p = x["decode_tok_s"], x["prefill_tok_s"]
        lines.append(f"| {x['label']} | {x['batch']} | {x['load_s']['median']:.2f} | {x['ttft_ms']['median']:.0f} | "
                     f"{p['median']:.0f} ({p['min']:.0f}-{p['max']:.0f}) | "
                     f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}){' (!)' if x['noisy'] else ''} | "
                     f"{100 * x['of_roofline']:.0f}% | {x['peak_rss_mb']:.0f} | {x['tokens_match']} |")
    for label, why in r["skipped"].items():
        lines.append(f"| {label} | | not run: {why} | | | | | | |")
    lines += ["", "Roofline: batch x read bandwidth / bytes of weights read per decode step (at the stack's "
                  "weight type; onnxruntime int8 counted as gptcpu's q8). Tokens: leading greedy tokens equal "
                  "to transformers' generate in every row."]
    if any(x.get("noisy") for x in r["rows"]):
        lines.append(f"(!) decode min-max wider than {SPREAD:.0%} of the median: too noisy to rank on that row.")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        rows = [x for x in r["rows"] if "error" not in x]
        batches = sorted({x["batch"] for x in rows})
        labels = list(dict.fromkeys(x["label"] for x in rows))
        width = 0.8 / len(batches)
        for j, b in enumerate(batches):
            by = {x["label"]: x for x in rows if x["batch"] == b}
            xs = [i + j * width for i, lab in enumerate(labels) if lab in by]
            ax.bar(xs, [by[lab]["decode_tok_s"]["median"] for lab in labels if lab in by], width,
                   label=f"decode, batch {b}")
            ax.scatter(xs, [by[lab]["roofline_tok_s"] for lab in labels if lab in by], marker="_", s=300,
                       color="black", label="roofline" if j == 0 else "_nolegend_", zorder=3)
        ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(labels))], labels, rotation=35,
                      ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("decode tokens/s (log)")
        ax.set_title(f"{r['model']}, {r['threads']} threads")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench(args) -> dict:
    from tqdm import tqdm

    from gptcpu.engine import blas
    from gptcpu.engine.info import account, config_of

    args.backend = args.backend or blas.default_backend()
    hf_dir, name, ours, graphs = prepare(args)
    config = config_of(str(hf_dir))
    a = account(config)
    # transformers runs the full GPT-J in bf16, as it is stored: its f32 (24 GB) does not fit
    all_cells, skipped = cells(args, hf_dir, ours, graphs, config.n_vocab, "bf16" if name == "gptj-full" else "f32")
    bw = []
    with tqdm(total=args.repeats * (len(all_cells) + 1), desc=f"bench {name}", unit="run", file=sys.stderr) as bar:
        for r in range(args.repeats):
            bw.append(bandwidth(args.threads))
            bar.update()
            k = r * len(all_cells) // max(1, args.repeats)     # rotate the order each repeat
            for c in all_cells[k:] + all_cells[:k]:
                bar.set_postfix_str(f"{c.label} x{c.batch}")
                c.runs.append(run_cell(c.argv))
                bar.update()
    return summarize(name, args, all_cells, skipped, bw, a["decode_bytes_per_token"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="gptcpu bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args) -> dict:
    result = bench(args)
    text = render(result)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot([result], args.plot)
    return result


if __name__ == "__main__":
    main()
