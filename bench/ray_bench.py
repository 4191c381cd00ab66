"""Ray on one machine: 1 replica x 2 threads against 2 replicas x 1 thread, and `gptcpu batch` with
1 and 2 actors against the in-process path.

    python -m gptcpu.bench.ray_bench [--clients 8] [--prompts 96] [--repeats 2]

Starts a local cluster with `ray start --head --num-cpus 2` (a session token), runs
`gptcpu serve --ray` for each layout with the GPT-2-small-shaped random model of bench/serve.py,
and measures requests/s and tokens/s for --clients concurrent streaming clients (64-token
prompts, 64 new tokens, two rounds); then `gptcpu batch` over --prompts prompts (32 new tokens
each) in process, and on Ray with 1 actor x 2 threads and 2 actors x 1 thread: prompts/s over the
whole command (Ray's connection and actor start included). Writes
bench/results/ray.md and .json, and stops the cluster with `ray stop`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def serve_layout(model: Path, address: str, port: int, replicas: int, threads: int, clients: int, vocab: int,
                 eos: int, repeats: int, env: dict) -> dict:
    from gptcpu.bench.serve import level, wait_healthy   # the same clients and wait as bench-serve

    proc = subprocess.Popen([sys.executable, "-m", "gptcpu.engine.cli", "serve", "--ray", "--address", address,
                             "--model", str(model), "--model-name", "bench", "--port", str(port), "--replicas",
                             str(replicas), "--threads-per-replica", str(threads), "--max-batch", "8"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=300)
        asyncio.run(level(url, 2, 16, 4, vocab, eos, 0))           # warm up every replica
        runs = []
        for r in range(repeats):
            t0 = time.perf_counter()
            rounds = [asyncio.run(level(url, clients, 64, 64, vocab, eos, 100 * r + k)) for k in range(2)]
            wall = time.perf_counter() - t0
            runs.append({"requests_s": 2 * clients / wall, "tok_s": sum(x["tokens"] for x in rounds) / wall})
            print(f"serve {replicas}x{threads}: {runs[-1]['tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return {"layout": f"{replicas} replica{'s' if replicas > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}",
            "requests_s": statistics.median(x["requests_s"] for x in runs),
            "tok_s": statistics.median(x["tok_s"] for x in runs)}


def batch_case(model: Path, inp: Path, work: Path, label: str, extra: list[str], env: dict, n: int) -> dict:
    out = work / f"batch-{label.replace(' ', '_')}.jsonl"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "gptcpu.engine.cli", "batch", str(inp), str(out), "--model", str(model),
                        "--quiet", *extra], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"gptcpu batch {label} failed: {r.stderr[-2000:]}")
    return {"case": label, "wall_s": wall, "prompts_s": n / wall}


def main(argv=None) -> dict:
    from gptcpu.bench.compare import machine, save
    from gptcpu.bench.serve import free_port, with_text_tokenizer
    from gptcpu.bench.speed import build
    from gptcpu.engine.config import Config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptcpu-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)

    model = with_text_tokenizer(build("gpt2", args.work)[1])
    config = Config.load(model)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
    port = 6300 + secrets.randbelow(500)
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True)
    address = f"127.0.0.1:{port}"
    inp = args.work / "ray-bench-prompts.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": list(range(10 + i % 7, 74 + i % 7)), "max_tokens": 32,
                                       "temperature": 0.8, "seed": i}) + "\n" for i in range(args.prompts)))
    try:
        http_port = free_port()   # one port for both: Ray Serve's proxy keeps its first port
        layouts = [serve_layout(model, address, http_port, r, t, args.clients, config.n_vocab, config.eos_token_id,
                                args.repeats, env) for r, t in ((1, 2), (2, 1))]
        cases = [batch_case(model, inp, args.work, "in process, 2 threads", ["--threads", "2"], env, args.prompts),
                 batch_case(model, inp, args.work, "ray 1 actor x 2 threads",
                            ["--ray", address, "--actors", "1", "--threads", "2"], env, args.prompts),
                 batch_case(model, inp, args.work, "ray 2 actors x 1 thread",
                            ["--ray", address, "--actors", "2", "--threads", "1"], env, args.prompts)]
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
    result = {"machine": machine(), "clients": args.clients, "prompts": args.prompts, "serve": layouts,
              "batch": cases}
    save(args.out, "ray", result, render(result))
    return result


def render(r: dict) -> str:
    lines = [f"Ray on one machine ({r['machine']}), GPT-2-small shape, f32. `gptcpu serve --ray`, {r['clients']} "
             "concurrent streaming clients, two rounds, 64-token prompts, 64 new tokens:", "",
             "| layout | requests/s | tokens/s |", "| --- | ---: | ---: |"]
    lines += [f"| {x['layout']} | {x['requests_s']:.2f} | {x['tok_s']:.1f} |" for x in r["serve"]]
    lines += ["", f"`gptcpu batch`, {r['prompts']} prompts of 64 tokens, 32 new tokens each (wall time of the "
                  "command, Ray's connection and actor start included):", "",
              "| case | seconds | prompts/s |", "| --- | ---: | ---: |"]
    lines += [f"| {x['case']} | {x['wall_s']:.1f} | {x['prompts_s']:.2f} |" for x in r["batch"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
