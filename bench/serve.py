"""`gptcpu serve` under 1, 2, 4 and 8 concurrent streaming clients: aggregate tokens/s, time to
first token and inter-token latency.

    python -m gptcpu.bench.serve [--shape gpt2] [--threads 2] [--clients 1,2,4,8] [--repeats 3]

Starts the real server (`gptcpu serve`, --max-batch 8) in a subprocess on a random GPT-2-small
model (bench.speed.build), then for each client count opens that many streams at once, each a
128-token prompt (token ids) and 128 new tokens (EOS banned with logit_bias, so every stream is
full length). Latencies are what the clients see: time to the first chunk with text, and the
gaps between chunks with text (a token that ends inside a UTF-8 character sends none). Levels are interleaved over the repeats (these machines are noisy) and reported as
medians. Aggregate tokens/s = all tokens streamed / wall time of the level, prefills included;
aggregate decode tokens/s = the sum over streams of each one's rate from its first token to its
last (other streams' prompt chunks, which share those steps, included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


async def one_stream(http, body) -> tuple[float, list[float], int]:
    """-> (time to first text, gaps between text chunks in seconds, tokens generated)."""
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return stamps[0] - t0, list(np.diff(stamps)), tokens, (tokens - 1) / (stamps[-1] - stamps[0])


async def level(url, clients, prompt_len, new, vocab, eos, seed):
    import httpx

    rng = np.random.default_rng(seed)
    bodies = [{"model": "bench", "prompt": rng.integers(0, vocab, prompt_len).tolist(), "max_tokens": new,
               "temperature": 0.8, "seed": int(i), "stream": True, "logit_bias": {str(eos): -100},
               "stream_options": {"include_usage": True}}
              for i in range(clients)]
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(http, b) for b in bodies))
        wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "decode_tok_s": sum(r[3] for r in results),
            "ttft": [r[0] for r in results], "itl": [g for r in results for g in r[1]]}


def with_text_tokenizer(model: Path) -> Path:
    """The random model beside a tokenizer in which every one of its token ids is text: the 256
    byte-level symbols, then a made-up word per id (decoding needs no merges). The bench model's
    own byte tokenizer decodes most ids to nothing, and a stream sends no chunk for no text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from gptcpu.engine.config import Config

    out = model.with_name(model.name + "-text")
    if (out / "tokenizer.json").exists():
        return out
    out.mkdir(exist_ok=True)
    for f in model.iterdir():
        if f.name != "tokenizer.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i in range(len(vocab), Config.load(model).n_vocab):
        word = "".join(chr(ord("a") + (i // 26 ** k) % 26) for k in range(4))
        vocab["\u0120" + word] = i    # "\u0120" is the byte-level symbol of a space
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the server at url answers /health with 200 (a starting Ray Serve replica answers
    500 first); stop it and fail if it exits (with the end of its output, when piped) or times out."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read()[-3000:] if proc.stdout else ""
            raise RuntimeError(f"the server exited with status {proc.returncode}" + (f": {out}" if out else ""))
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not become healthy in {timeout:.0f} s")


def start_server(model: Path, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gptcpu.engine.cli", "serve", "--model", str(model),
                             "--model-name", "bench", "--port", str(port), "--threads", str(threads),
                             "--max-batch", str(max_batch), "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return proc, url


def main(argv=None) -> dict:
    from gptcpu.bench.compare import machine, save
    from gptcpu.bench.speed import build
    from gptcpu.engine.config import Config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptcpu-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]

    _, model = build(args.shape, args.work)
    model = with_text_tokenizer(model)
    config = Config.load(model)
    proc, url = start_server(model, args.threads, max(levels))
    runs: dict[int, list[dict]] = {c: [] for c in levels}
    try:
        asyncio.run(level(url, 2, args.prompt, 8, config.n_vocab, config.eos_token_id, 0))   # warm up
        for r in range(args.repeats):
            for c in levels:
                runs[c].append(asyncio.run(level(url, c, args.prompt, args.new, config.n_vocab,
                                                 config.eos_token_id, r)))
                print(f"repeat {r + 1}: {c} clients {runs[c][-1]['tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    rows = []
    for c in levels:
        tok_s = [x["tok_s"] for x in runs[c]]
        decode = [x["decode_tok_s"] for x in runs[c]]
        ttft = [t for x in runs[c] for t in x["ttft"]]
        itl = [g for x in runs[c] for g in x["itl"]]
        rows.append({"clients": c, "tok_s": statistics.median(tok_s), "tok_s_range": [min(tok_s), max(tok_s)],
                     "decode_tok_s": statistics.median(decode), "decode_range": [min(decode), max(decode)],
                     "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
                     "itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99)})
    for row in rows:
        row["speedup"] = row["tok_s"] / rows[0]["tok_s"]
        row["decode_speedup"] = row["decode_tok_s"] / rows[0]["decode_tok_s"]
    result = {"shape": args.shape, "dtype": config.dtype, "threads": args.threads, "prompt": args.prompt,
              "new": args.new, "repeats": args.repeats, "cpu": machine(), "rows": rows}
    save(args.out, "serve", result, render(result))
    return result


def render(r: dict) -> str:
    lines = [f"`gptcpu serve`, {r['shape']} shape ({r['dtype']}), {r['threads']} threads, --max-batch 8, "
             f"{r['prompt']}-token prompts, {r['new']} new tokens per stream, medians of {r['repeats']} ({r['cpu']})",
             "", "| clients | aggregate tok/s, wall (min-max) | vs 1 | aggregate decode tok/s (min-max) | vs 1 "
                 "| TTFT p50 / p99 ms | inter-token p50 / p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        lo, hi = row["tok_s_range"]
        dlo, dhi = row["decode_range"]
        lines.append(f"| {row['clients']} | {row['tok_s']:.1f} ({lo:.1f}-{hi:.1f}) | {row['speedup']:.2f}x | "
                     f"{row['decode_tok_s']:.1f} ({dlo:.1f}-{dhi:.1f}) | {row['decode_speedup']:.2f}x | "
                     f"{row['ttft_p50_ms']:.0f} / {row['ttft_p99_ms']:.0f} | "
                     f"{row['itl_p50_ms']:.1f} / {row['itl_p99_ms']:.1f} |")
    lines += ["", "Wall: all tokens / the level's wall time, the prompts' prefill included. Decode: the sum over "
                  "streams of (tokens - 1) / (last token - first token), the rate while they run together."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
