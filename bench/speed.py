"""gptcpu f32 against transformers on torch CPU: prefill and decode, one process, one run.

    python -m gptcpu.bench.speed [--shape gpt2] [--threads 2] [--prompt 128] [--new 128] [--repeats 3]

Builds a random model from a real config (GPT-2-small by default; `gptj-4l` is GPT-J-6B's width
with 4 layers), saves it with transformers, converts it with gptcpu, then alternates the stacks
over the repeats (these machines are noisy) and reports medians with min-max. Decode speed is
measured per token from the second new token on (the first one is the prefill's), and set
against the roofline: the read bandwidth measured in the same run / bytes of weights per token.
Both stacks must produce the same greedy tokens: a fast wrong answer is not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"gpt2": ("gpt2", {}), "gpt2-medium": ("gpt2-medium", {}), "gptj-4l": ("gpt-j-6b", {"n_layer": 4})}


class ReadProbe:
    """Plain reads of a 1 GiB float32 file in the kind of memory the weights live in (written,
    evicted and mapped as convert and load do: the page cache's huge pages where the kernel has
    them, engine.weights.map_file), cut in `parts` slices read in turn: with 4, each read is of
    memory 768 MB of others have passed since, far past any cache. `read()` is the fastest of
    three reads of the next slices: np.max split across `threads` threads, the BLAS's GEMV
    and gptcpu's own decode kernel over [rows, 1024] (np.sum's pairwise summation is slower
    than memory on one core; it would understate the roofline. So do np.max and the GEMV on
    their own: the kernel streams rows ~45% faster here, and a roofline that decode passes is
    no bound). The BLAS pool and the kernels' pool should already be limited to `threads`."""

    def __init__(self, threads: int, nbytes: int = 1 << 30, parts: int = 1):
        import tempfile

        from gptcpu.engine.weights import evict, map_file

        self.file = tempfile.NamedTemporaryFile(dir=os.environ.get("GPTCPU_BENCH_TMP", "/tmp"))
        np.ones(nbytes // 4, np.float32).tofile(self.file)
        evict(self.file)
        a = np.frombuffer(map_file(self.file.name), np.float32)
        a.max()  # fault every page in
        self.slices = [s.reshape(-1, 1024) for s in np.array_split(a[:len(a) // (1024 * parts) * 1024 * parts], parts)]
        self.threads, self.pool, self.next = threads, ThreadPoolExecutor(threads), 0
        self.x, self.out = np.ones(1024, np.float32), np.empty((1, 1024), np.float32)
        self.xk = np.ones((1, len(self.slices[0])), np.float32)

    def read(self) -> float:
        """Bytes/s: the best of the three reads, each over the next slice."""
        from gptcpu.engine import kernels

        best = 0.0
        for method in range(3):
            m = self.slices[self.next % len(self.slices)]
            self.next += 1
            t = time.perf_counter()
            if method == 0:
                list(self.pool.map(np.max, np.array_split(m.reshape(-1), self.threads)))
            elif method == 1:
                m @ self.x
            else:
                kernels.matvec(self.xk, m, self.out)
            best = max(best, m.nbytes / (time.perf_counter() - t))
        return best

    def close(self) -> None:
        self.pool.shutdown()
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of the fastest plain read of 1 GiB (ReadProbe, whole), best of repeats."""
    with ReadProbe(threads, nbytes) as probe:
        return max(probe.read() for _ in range(repeats))


def build(shape: str, work: Path) -> tuple[Path, Path]:
    """-> (HF folder, gptcpu f32 folder), made once and reused."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base, overrides = SHAPES[shape]
    hf_dir, ours = work / f"hf-{shape}", work / f"gptcpu-{shape}-f32"
    if not (hf_dir / "config.json").exists():
        cfg = json.loads((ROOT / "tests" / "configs" / f"{base}.json").read_text()) | overrides
        config = AutoConfig.for_model(**cfg)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(hf_dir)
        from gptcpu.bench.convert_memory import write_byte_tokenizer
        write_byte_tokenizer(hf_dir)
    if not (ours / "model.safetensors").exists():
        import gptcpu
        gptcpu.convert(str(hf_dir), ours, dtype="f32", force=True, progress=False)
    return hf_dir, ours


def time_gptcpu(model, ids, new):
    t0 = time.perf_counter()
    stamps, tokens = [], []
    for tok in model.generate(ids, new):
        stamps.append(time.perf_counter())
        tokens.append(tok)
    return t0, stamps, tokens


def time_torch(hf, ids, new):
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.stamps, self.tokens, self.first = [], [], True

        def put(self, value):
            if self.first:   # the prompt
                self.first = False
                return
            self.stamps.append(time.perf_counter())
            self.tokens.append(int(value.reshape(-1)[0]))

        def end(self):
            pass

    s = Stamps()
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                    do_sample=False, pad_token_id=0, streamer=s)
    return t0, s.stamps, s.tokens


def summarize(runs, n_prompt):
    prefill = [n_prompt / (stamps[0] - t0) for t0, stamps, _ in runs]
    decode = [1 / statistics.median(np.diff(stamps)) for _, stamps, _ in runs]
    return {"prefill_tok_s": statistics.median(prefill), "prefill_range": [min(prefill), max(prefill)],
            "decode_tok_s": statistics.median(decode), "decode_range": [min(decode), max(decode)],
            "ttft_ms": 1000 * statistics.median(stamps[0] - t0 for t0, stamps, _ in runs)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptcpu-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    import gptcpu
    from gptcpu.engine.info import account

    torch.set_num_threads(args.threads)
    hf_dir, ours = build(args.shape, args.work)
    model = gptcpu.load(ours, threads=args.threads)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, 50257, args.prompt).tolist()
    bandwidth = read_bandwidth(args.threads)
    runs = {"gptcpu f32": [], "transformers f32": []}
    for r in range(args.repeats + 1):   # repeat 0 warms both up and is not counted
        for name, fn in (("gptcpu f32", lambda: time_gptcpu(model, ids, args.new)),
                         ("transformers f32", lambda: time_torch(hf, ids, args.new))):
            result = fn()
            if r:
                runs[name].append(result)
            print(f"repeat {r} {name}: {len(result[2])} tokens", file=sys.stderr)
    same = runs["gptcpu f32"][0][2] == runs["transformers f32"][0][2]
    a = account(model.config)
    bytes_per_token = a["decode_bytes_per_token"]["f32"]
    roofline = bandwidth / bytes_per_token
    result = {"shape": args.shape, "threads": args.threads, "prompt": args.prompt, "new": args.new,
              "repeats": args.repeats, "read_bandwidth_gbps": bandwidth / 1e9,
              "weight_bytes_per_token": bytes_per_token, "roofline_tok_s": roofline,
              "greedy_tokens_match": same, "stacks": {k: summarize(v, args.prompt) for k, v in runs.items()}}
    g, t = result["stacks"]["gptcpu f32"], result["stacks"]["transformers f32"]
    result["decode_ratio"] = g["decode_tok_s"] / t["decode_tok_s"]
    result["prefill_ratio"] = g["prefill_tok_s"] / t["prefill_tok_s"]
    print(render(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"speed-{args.shape}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def render(r: dict) -> str:
    lines = [f"{r['shape']}, batch 1, {r['threads']} threads, {r['prompt']}-token prompt, {r['new']} new tokens, "
             f"median of {r['repeats']} (min-max); read bandwidth {r['read_bandwidth_gbps']:.1f} GB/s, "
             f"f32 roofline {r['roofline_tok_s']:.1f} tok/s",
             "", "| stack | prefill tok/s | decode tok/s | time to first token | decode / roofline |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, s in r["stacks"].items():
        lines.append(f"| {name} | {s['prefill_tok_s']:.0f} ({s['prefill_range'][0]:.0f}-{s['prefill_range'][1]:.0f}) "
                     f"| {s['decode_tok_s']:.1f} ({s['decode_range'][0]:.1f}-{s['decode_range'][1]:.1f}) "
                     f"| {s['ttft_ms']:.0f} ms | {100 * s['decode_tok_s'] / r['roofline_tok_s']:.0f}% |")
    lines += ["", f"gptcpu / transformers: decode {r['decode_ratio']:.2f}x, prefill {r['prefill_ratio']:.2f}x; "
                  f"greedy tokens {'identical' if r['greedy_tokens_match'] else 'DIFFER'}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
