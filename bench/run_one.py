"""One gptcpu measurement in a fresh process (the BLAS and threading layer are per process).

    python -m gptcpu.bench.run_one MODEL [--backend B] [--threading T] [--threads N]
                                   [--prompt 128] [--new 128] [--bandwidth]

Prints one JSON line: load seconds, prefill tokens/s (the prompt's forward pass), decode
tokens/s (median per-token time from the second new token on) and the greedy tokens.
--bandwidth instead measures the read bandwidth (np.max over 1 GiB, split across the threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--backend")
    ap.add_argument("--threading")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--bandwidth", action="store_true")
    args = ap.parse_args(argv)

    if args.bandwidth:
        from threadpoolctl import threadpool_limits

        from gptcpu.bench.speed import read_bandwidth
        threadpool_limits(args.threads)
        print(json.dumps({"read_bandwidth": read_bandwidth(args.threads)}))
        return

    import gptcpu
    from gptcpu.bench.speed import time_gptcpu

    t0 = time.perf_counter()
    m = gptcpu.load(args.model, threads=args.threads, backend=args.backend, threading=args.threading)
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, min(m.config.n_vocab, 50257), args.prompt).tolist()
    list(m.generate(ids[:16], 4))  # compile or load the kernels (prefill's and decode's), start the pools
    t0, stamps, tokens = time_gptcpu(m, ids, args.new)
    print(json.dumps({"load_s": load_s, "prefill_tok_s": args.prompt / (stamps[0] - t0),
                      "decode_tok_s": 1 / statistics.median(np.diff(stamps)), "tokens": tokens,
                      "dtype": m.config.dtype}))


if __name__ == "__main__":
    main()
