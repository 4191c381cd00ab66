"""Milliseconds per continuous-batch decode step at batch 1, 2, 4 and 8, in process.

    python -m gptcpu.bench.batch_steps MODEL [--threads 2] [--batches 1,2,4,8] [--repeats 3]

B members with 128-token random prompts (prefilled first, not timed) sampling at temperature
0.8 with EOS banned; then 32 `Batch.step()` calls are timed, batch sizes interleaved over the
repeats; medians. What the server's throughput is made of, without HTTP.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main(argv=None) -> None:
    import gptcpu
    from gptcpu.engine.batch import Batch, Member, Sampling

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    m = gptcpu.load(args.model, threads=args.threads)
    ban = {m.config.eos_token_id: -100.0} if m.config.eos_token_id is not None else None
    rng = np.random.default_rng(0)
    times: dict[int, list[float]] = {}
    for _ in range(args.repeats):
        for b in (int(x) for x in args.batches.split(",")):
            batch = Batch(m, max_batch=b, prefill_chunk=None)
            for i in range(b):
                prompt = rng.integers(0, min(m.config.n_vocab, 50257), 128).tolist()
                batch.add(Member(m, prompt, Sampling(max_new_tokens=64, temperature=0.8, seed=i, logit_bias=ban)))
            batch.step()
            batch.step()   # the first decode step compiles or loads the kernels for this batch size
            t = time.perf_counter()
            for _ in range(32):
                batch.step()
            times.setdefault(b, []).append((time.perf_counter() - t) / 32)
    base = statistics.median(times[min(times)])
    for b, ts in times.items():
        ms = statistics.median(ts) * 1e3
        print(f"batch {b}: {ms:.1f} ms/step ({min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}), {b / ms * 1e3:.0f} tok/s, "
              f"{b * base / (ms / 1e3) / min(times):.2f}x batch {min(times)}")


if __name__ == "__main__":
    main()
