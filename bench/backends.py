"""Decode and prefill per weight dtype, and per BLAS backend x threading layer x threads.

    python -m gptcpu.bench.backends [--models gpt2,gptj-4l] [--repeats 3] [--matrix]

Every measurement runs in its own process (bench/run_one.py: the BLAS and the threading layer
are chosen once per process), one at a time, the configurations interleaved across repeats
(these machines are noisy); medians with min-max. The roofline of each dtype is the read
bandwidth measured in the same run divided by the bytes that dtype reads per decode token
(`gptcpu info`). "vs f32" is taken within each repeat (its dtypes run back to back) and "of
roofline" against the bandwidth measured just before that dtype's run; their medians over
repeats are shown, with min-max: these machines' memory speed drifts in phases of minutes, so
a bandwidth measured once per repeat put some GPT-J-width runs at 105-140% of their roofline.
Then the same dtypes again, interleaved in one process (--interleaved-repeats; run_one's
interleaved: one token of each dtype in turn), where no phase of the memory speed can fall on
one dtype's run and not another's; there the read bandwidth is measured in the same rounds
(three cold reads of 256 MB before each round of steps), and each repeat's roofline is the
median of its rounds', as its decode speed is the median of its steps.
Results go to bench/results/backends.json and .md (and a plot with --plot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from gptcpu.bench.speed import ROOT, build
from gptcpu.engine.blas import NAMES

DTYPES = ("f32", "bf16", "f16", "q8")
CONFIGS = [("openblas", "openmp"), ("openblas", "tbb"), ("mkl", "openmp"), ("mkl", "tbb"), ("mkl", "sequential")]


def run(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "gptcpu.bench.run_one", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"run_one {' '.join(args)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def folders(shape: str, work: Path) -> dict[str, Path]:
    import gptcpu

    hf_dir, f32 = build(shape, work)
    out = {"f32": f32}
    for dt in DTYPES[1:]:
        out[dt] = work / f"gptcpu-{shape}-{dt}"
        if not (out[dt] / "model.safetensors").exists():
            gptcpu.convert(str(hf_dir), out[dt], dtype=dt, force=True, progress=False)
    return out


def med(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def row(decode, prefill, f32_decode, f32_prefill, bandwidths, nbytes, same_tokens) -> dict:
    """One dtype's line, from its runs and f32's paired with them (one of each per repeat) and
    the bandwidth each of its runs is held against: medians (min-max) of the paired ratios."""
    return {"decode": med(decode), "prefill": med(prefill),
            "roofline": statistics.median(bandwidths) / nbytes,
            "decode_vs_f32": med([d / f for d, f in zip(decode, f32_decode)]),
            "prefill_vs_f32": med([p / f for p, f in zip(prefill, f32_prefill)]),
            "of_roofline": med([d / (b / nbytes) for d, b in zip(decode, bandwidths)]),
            "runs": {"decode": decode, "prefill": prefill, "read_bandwidth": bandwidths},
            "same_tokens_as_f32": same_tokens}


def dtype_table(shape: str, models: dict, threads: int, repeats: int, prompt: int, new: int,
                backend: str = "openblas") -> dict:
    from gptcpu.engine.info import account, config_of

    runs = {dt: [] for dt in models}
    bws = {dt: [] for dt in models}     # the bandwidth measured just before each run
    bw = []                             # all of them, in order
    for r in range(repeats):
        for dt, folder in models.items():
            bw.append(run(["--bandwidth", "--threads", str(threads)])["read_bandwidth"])
            bws[dt].append(bw[-1])
            runs[dt].append(run([str(folder), "--backend", backend, "--threads", str(threads), "--prompt", str(prompt),
                                 "--new", str(new)]))
            print(f"{shape} {dt} repeat {r}: decode {runs[dt][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    nbytes = account(config_of(str(models["f32"])))["decode_bytes_per_token"]
    f32 = runs["f32"]
    # ratios within each repeat (its dtypes ran back to back), each run against the bandwidth
    # measured just before it, then their median: this machine's memory speed drifts
    rows = {dt: row([x["decode_tok_s"] for x in rs], [x["prefill_tok_s"] for x in rs],
                    [x["decode_tok_s"] for x in f32], [x["prefill_tok_s"] for x in f32], bws[dt], nbytes[dt],
                    rs[0]["tokens"] == f32[0]["tokens"])
            for dt, rs in runs.items()}
    return {"shape": shape, "threads": threads, "backend": backend, "read_bandwidth": med(bw), "read_bandwidth_runs": bw,
            "rows": rows}


def interleaved_table(shape: str, models: dict, threads: int, repeats: int, prompt: int, new: int,
                      backend: str = "openblas") -> dict:
    """The dtypes decoding token by token in turn in one process: ratios paired within each
    repeat, each repeat's roofline at the median read bandwidth of its rounds."""
    from gptcpu.engine.info import account, config_of

    dts = list(models)
    x = run(["--interleave", *(str(models[dt]) for dt in dts), "--backend", backend, "--threads", str(threads),
             "--repeats", str(repeats), "--prompt", str(prompt), "--new", str(new)])
    nbytes = account(config_of(str(models["f32"])))["decode_bytes_per_token"]
    bw = x["read_bandwidth"]
    f32 = dts.index("f32")
    rows = {}
    for i, dt in enumerate(dts):
        rows[dt] = row(x["decode_tok_s"][i], x["prefill_tok_s"][i], x["decode_tok_s"][f32], x["prefill_tok_s"][f32],
                       bw, nbytes[dt], x["tokens"][i] == x["tokens"][f32])
        print(f"{shape} {dt} interleaved: decode {rows[dt]['decode']['median']:.1f} tok/s", file=sys.stderr)
    return {"shape": shape, "threads": threads, "backend": backend, "interleaved": True,
            "read_bandwidth": med(bw), "read_bandwidth_runs": bw,
            "read_bandwidth_range": x["read_bandwidth_range"], "rows": rows}


def matrix(shape: str, models: dict, dtypes, prompt: int, new: int) -> list[dict]:
    out = []
    for dt in dtypes:
        for threads in (1, 2):
            for backend, threading in CONFIGS:
                x = run([str(models[dt]), "--backend", backend, "--threading", threading, "--threads", str(threads),
                         "--prompt", str(prompt), "--new", str(new)])
                out.append({"shape": shape, "dtype": dt, "backend": backend, "threading": threading,
                            "threads": threads, "prefill_tok_s": x["prefill_tok_s"], "decode_tok_s": x["decode_tok_s"]})
                print(f"{shape} {dt} {backend}/{threading} x{threads}: prefill {x['prefill_tok_s']:.0f}, "
                      f"decode {x['decode_tok_s']:.1f}", file=sys.stderr)
    return out


def machine() -> str:
    """The CPU the figures come from: its model name, LLVM's name for it, the CPUs gptcpu uses by default."""
    import platform

    from llvmlite import binding   # the microarchitecture, which a VM's model name may hide

    from gptcpu.engine.blas import cpuinfo
    from gptcpu.engine.threads import available_cpus
    name = cpuinfo("model name") or platform.processor() or platform.machine()
    return f"{name} ({binding.get_host_cpu_name()}), {available_cpus()} cores"


def render(tables: list[dict], mat: list[dict], cpu: str = "") -> str:
    lines = [f"Machine: {cpu}", ""] if cpu else []
    for t in tables:
        bw = t["read_bandwidth"]
        how = ("interleaved in one process, a token of each dtype in turn" if t.get("interleaved")
               else "each run in its own process")
        blas = NAMES.get(t.get("backend", "openblas"), t.get("backend"))
        lines += [f"**{t['shape']}**, batch 1, {t['threads']} threads, {blas}, {how}; read bandwidth "
                  f"{bw['median'] / 1e9:.1f} GB/s ({bw['min'] / 1e9:.1f}-{bw['max'] / 1e9:.1f})", "",
                  "| weights | prefill tok/s | vs f32 | decode tok/s | vs f32 | roofline | of roofline | tokens = f32 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for dt, r in t["rows"].items():
            d, p, dv, pv, of = r["decode"], r["prefill"], r["decode_vs_f32"], r["prefill_vs_f32"], r["of_roofline"]
            lines.append(f"| {dt} | {p['median']:.0f} ({p['min']:.0f}-{p['max']:.0f}) | "
                         f"{pv['median']:.2f}x ({pv['min']:.2f}-{pv['max']:.2f}) | "
                         f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | "
                         f"{dv['median']:.2f}x ({dv['min']:.2f}-{dv['max']:.2f}) | {r['roofline']:.1f} | "
                         f"{100 * of['median']:.0f}% ({100 * of['min']:.0f}-{100 * of['max']:.0f}) | "
                         f"{'yes' if r['same_tokens_as_f32'] else 'no'} |")
        lines.append("")
    if mat:
        lines += ["| model | weights | backend | threading | threads | prefill tok/s | decode tok/s |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: |"]
        for m in mat:
            lines.append(f"| {m['shape']} | {m['dtype']} | {m['backend']} | {m['threading']} | {m['threads']} | "
                         f"{m['prefill_tok_s']:.0f} | {m['decode_tok_s']:.1f} |")
    return "\n".join(lines)


def plot(tables: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(tables))
    rows = (len(tables) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(tables):]:
        ax.axis("off")
    for ax, t in zip(axes.flat, tables):
        dts = list(t["rows"])
        ax.bar(dts, [t["rows"][d]["decode"]["median"] for d in dts], color="tab:blue", label="gptcpu decode")
        ax.scatter(dts, [t["rows"][d]["roofline"] for d in dts], color="tab:red", marker="_", s=800,
                   label="roofline (bandwidth / bytes per token)")
        ax.set_title(f"{t['shape']}, {t['threads']} threads" + (", interleaved" if t.get("interleaved") else ""))
        ax.set_ylabel("decode tokens/s")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,gptj-4l")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--interleaved-repeats", type=int, default=5, help="0: no interleaved table")
    ap.add_argument("--matrix", action="store_true", help="also every backend x threading x threads 1, 2")
    ap.add_argument("--matrix-dtypes", default="f32,bf16")
    ap.add_argument("--matrix-only", action="store_true", help="skip the per-dtype tables")
    ap.add_argument("--backend", choices=["openblas", "mkl"],
                    help="the BLAS of the per-dtype tables (default: gptcpu's, engine.blas.default_backend)")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptcpu-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    tables, mat = [], []
    from gptcpu.engine.blas import default_backend
    backend = args.backend or default_backend()
    for shape in args.models.split(","):
        models = folders(shape, args.work)
        if not args.matrix_only:
            tables.append(dtype_table(shape, models, args.threads, args.repeats, args.prompt, args.new, backend))
            if args.interleaved_repeats:
                tables.append(interleaved_table(shape, models, args.threads, args.interleaved_repeats,
                                                args.prompt, args.new, backend))
        if args.matrix or args.matrix_only:
            mat += matrix(shape, models, args.matrix_dtypes.split(","), args.prompt, args.new)
    cpu = machine()
    text = render(tables, mat, cpu)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backends.json").write_text(json.dumps({"machine": cpu, "tables": tables, "matrix": mat}, indent=2) + "\n")
    (args.out / "backends.md").write_text(text + "\n")
    if args.plot and tables:
        plot(tables, args.plot)


if __name__ == "__main__":
    main()
