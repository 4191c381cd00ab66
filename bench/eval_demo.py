"""Held-out perplexity of the embedded demo model at every dtype, and transformers' at f32.

    python -m gptcpu.bench.eval_demo [--stride 128] [--threads 2]

The test split is engine/demo/test_files.txt (paths under this Python's standard library, held
out by file when the model was trained). gptcpu evaluates the converted model at f32, f16,
bf16 and q8; transformers (torch CPU) evaluates the original checkpoint at f32 over the very
same windows (gptcpu.engine.evaluate's sliding-window method), so the f32 figures must agree.
Writes bench/results/demo-eval.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "engine" / "demo"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    import gptcpu
    from gptcpu.engine.evaluate import evaluate

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / line.strip() for line in (DEMO / "test_files.txt").read_text().splitlines() if line.strip()]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"{len(missing)} held-out files are missing under {stdlib}, e.g. {missing[0]}")
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("f32", "f16", "bf16", "q8"):
            model = gptcpu.load(gptcpu.convert(str(DEMO), Path(tmp) / dtype, dtype=dtype, progress=False),
                                threads=args.threads)
            t = time.perf_counter()
            r = evaluate(model, files, stride=args.stride, show_progress=False)
            rows.append({"engine": "gptcpu", "dtype": dtype, "seconds": time.perf_counter() - t, **r.as_dict()})
        hf = AutoModelForCausalLM.from_pretrained(DEMO).eval()

        def hf_logits(ids):
            with torch.inference_mode():
                return hf(torch.as_tensor(ids)[None]).logits[0].float().numpy()

        t = time.perf_counter()
        r = evaluate(model, files, stride=args.stride, show_progress=False, logits_fn=hf_logits)
        rows.append({"engine": "transformers", "dtype": "f32", "seconds": time.perf_counter() - t, **r.as_dict()})
    lines = [f"Held-out split: {len(files)} files of the standard library ({rows[0]['tokens']:,} tokens, "
             f"{rows[0]['bytes']:,} bytes), windows of the model's 256-token context sliding by {args.stride}.", "",
             "| engine | weights | perplexity | bits per byte | seconds |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['engine']} | {r['dtype']} | {r['perplexity']:.4f} | {r['bits_per_byte']:.4f} | {r['seconds']:.1f} |"
              for r in rows]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo-eval.md").write_text(text + "\n")
    (args.out / "demo-eval.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
