"""One stack, one measurement, in a fresh process: what `gptcpu bench` runs for each cell.

    python -m gptcpu.bench.stacks STACK MODEL --threads N --prompt P --new K --batch B

STACK is gptcpu (MODEL a gptcpu folder; --backend), torch (transformers' generate), torch-loop
(a plain greedy loop over transformers' KV cache), or ort (MODEL an .onnx graph exported with
past key/values by bench/onnx_export.py, run by a Python greedy loop feeding the cache back).
Every stack gets the same prompt tokens (seeded; B rows of P tokens, no padding) and decodes
greedily for K tokens. Prints one JSON line: load seconds, time to first token, prefill tokens/s
(B x P / TTFT), decode tokens/s (B / the median step time, the first new token excluded), the
peak RSS of this process (VmHWM) and each row's tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def prompt_ids(batch: int, length: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, min(vocab, 50257), (batch, length))


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_gptcpu(model, ids, new, threads, backend):
    import gptcpu
    from gptcpu.engine.batch import Batch, Member, Sampling

    t = time.perf_counter()
    m = gptcpu.load(model, threads=threads, backend=backend)
    load = time.perf_counter() - t
    # compile or load the kernels, start the pools: 16 prompt tokens, so that prefill's GEMM
    # (past the GEMV's 8 rows) is loaded too, not inside the first timed prompt
    list(m.generate(ids[0, :16].tolist(), 3))
    if len(ids) > 1:                               # and the batch kernels
        m.generate_batch([r[:16].tolist() for r in ids], 3)
    batch = Batch(m, max_batch=len(ids), prefill_chunk=None, capacity=ids.shape[1] + new)
    members = [batch.add(Member(m, row.tolist(), Sampling(max_new_tokens=new))) for row in ids]
    t0, stamps = time.perf_counter(), []
    while batch:
        batch.step()
        stamps.append(time.perf_counter())
    return load, t0, stamps, [mem.output for mem in members]


def run_torch(model, ids, new, threads, loop, dtype="f32"):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype={"f32": torch.float32, "bf16": torch.bfloat16}[dtype]).eval()
    load = time.perf_counter() - t
    x = torch.as_tensor(ids)
    with torch.inference_mode():
        hf(x[:, :8])                               # warm up the kernels
        if loop:
            return (load, *_torch_loop(hf, x, new))
        return (load, *_torch_generate(hf, x, new))


def _torch_generate(hf, x, new):
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.stamps, self.first = [], True

        def put(self, value):
            if self.first:   # the prompt
                self.first = False
                return
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    s = Stamps()
    t0 = time.perf_counter()
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                      pad_token_id=0, streamer=s)
    return t0, s.stamps, out[:, x.shape[1]:].tolist()


def _torch_loop(hf, x, new):
    import torch

    t0, stamps, tokens = time.perf_counter(), [], []
    out = hf(x, use_cache=True)
    for _ in range(new):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        stamps.append(time.perf_counter())
        tokens.append(nxt)
        if len(tokens) == new:
            break
        out = hf(nxt, past_key_values=out.past_key_values, use_cache=True)
    return t0, stamps, torch.cat(tokens, 1).tolist()


def run_ort(model, ids, new, threads):
    import onnxruntime as ort

    from gptcpu.bench.onnx_export import Graph

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    t = time.perf_counter()
    g = Graph(ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"]))
    load = time.perf_counter() - t
    g.greedy(ids[:, :8], 2)                        # warm up
    return (load, *g.greedy(ids, new, timed=True))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stack", choices=["gptcpu", "torch", "torch-loop", "ort"])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--backend")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="transformers' weights (torch stacks)")
    args = ap.parse_args(argv)

    ids = prompt_ids(args.batch, args.prompt, args.vocab)
    if args.stack == "gptcpu":
        load, t0, stamps, tokens = run_gptcpu(args.model, ids, args.new, args.threads, args.backend)
    elif args.stack == "ort":
        load, t0, stamps, tokens = run_ort(args.model, ids, args.new, args.threads)
    else:
        load, t0, stamps, tokens = run_torch(args.model, ids, args.new, args.threads, args.stack == "torch-loop",
                                             args.dtype)
    ttft = stamps[0] - t0
    print(json.dumps({"load_s": load, "ttft_s": ttft, "prefill_tok_s": args.batch * args.prompt / ttft,
                      "decode_tok_s": args.batch / statistics.median(np.diff(stamps)),
                      "peak_rss": peak_rss(), "tokens": tokens}))


if __name__ == "__main__":
    main()
