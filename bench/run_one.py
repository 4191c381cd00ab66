"""One gptcpu measurement in a fresh process (the BLAS and threading layer are per process).

    python -m gptcpu.bench.run_one MODEL [--backend B] [--threading T] [--threads N]
                                   [--prompt 128] [--new 128] [--prefill-rounds 5] [--bandwidth]
    python -m gptcpu.bench.run_one --interleave MODEL MODEL ... [--repeats 3] [--threads N] ...

Prints one JSON line: load seconds, prefill tokens/s (the prompt's forward pass, to the first
token of a generation: the median of --prefill-rounds of them; one alone, of a GPT-2-small
prompt's ~0.17 s, put f16's prefill at 0.72-1.22x f32 across runs, where the median of 15
rounds, alternating, gave 0.97x), decode tokens/s (median per-token time from the second new
token on) and the greedy tokens.
--bandwidth instead measures the read bandwidth (speed.read_bandwidth: plain reads of 1 GiB).
--interleave runs several models in this one process, token by token in turn (see interleaved).
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
    ap.add_argument("--prefill-rounds", type=int, default=5)
    ap.add_argument("--bandwidth", action="store_true")
    ap.add_argument("--interleave", nargs="+", metavar="MODEL")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    if args.interleave:
        print(json.dumps(interleaved(args.interleave, args.threads, args.repeats, args.prompt, args.new,
                                     args.backend, args.threading, args.prefill_rounds)))
        return

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
    prefill = [stamps[0] - t0] + [first_token_s(m, ids) for _ in range(args.prefill_rounds - 1)]
    print(json.dumps({"load_s": load_s, "prefill_tok_s": args.prompt / statistics.median(prefill),
                      "decode_tok_s": 1 / statistics.median(np.diff(stamps)), "tokens": tokens,
                      "dtype": m.config.dtype}))


def first_token_s(model, ids) -> float:
    """Seconds to the first token of a fresh generation of ids: the prompt's forward pass."""
    t0 = time.perf_counter()
    next(model.generate(ids, 1))
    return time.perf_counter() - t0


def interleaved(folders: list[str], threads: int, repeats: int, prompt: int, new: int,
                backend: str | None = None, threading: str | None = None, prefill_rounds: int = 5) -> dict:
    """The models side by side in one process: each repeat prefills each model in turn,
    prefill_rounds times (the order rotating; its prefill speed the median), then decodes one
    token of each in turn (the order rotating every step), so that every model's
    steps sample the same minutes of this machine's drifting memory speed. Each round of
    steps also reads 3 x 256 MB of cold memory (speed.ReadProbe), so that the roofline samples
    those minutes too, with the same statistic as the steps: per repeat, the median of its
    rounds' read bandwidths. (Measured only before and after each repeat, as this did until
    90b62ff, a flip of the memory speed between the two readings put f32 at 60% of its
    roofline in one repeat and 110% in the next; read in the rounds, 82-89% over five.)
    -> per model: prefill tok/s and decode tok/s (from the median step) per repeat, the greedy
    tokens; the read bandwidth per repeat, and its rounds' [min, max]."""
    import gptcpu
    from gptcpu.bench.speed import ReadProbe

    models = [gptcpu.load(f, threads=threads, backend=backend, threading=threading) for f in folders]
    n_vocab = min(m.config.n_vocab for m in models)
    ids = np.random.default_rng(0).integers(0, min(n_vocab, 50257), prompt).tolist()
    for m in models:
        list(m.generate(ids[:16], 4))   # compile or load the kernels, start the pools
    out = {"prefill_tok_s": [[] for _ in models], "decode_tok_s": [[] for _ in models],
           "tokens": [None] * len(models), "read_bandwidth": [], "read_bandwidth_range": []}
    with ReadProbe(threads, parts=4) as probe:
        for r in range(repeats):
            prefills = [[] for _ in models]
            for p in range(prefill_rounds - 1):
                for j in range(len(models)):
                    i = (j + r + p) % len(models)
                    prefills[i].append(first_token_s(models[i], ids))
            gens, tokens = [m.generate(ids, new) for m in models], [[] for _ in models]
            for j in range(len(models)):
                i = (j + r) % len(models)
                t0 = time.perf_counter()
                tokens[i].append(next(gens[i]))
                prefills[i].append(time.perf_counter() - t0)
                out["prefill_tok_s"][i].append(prompt / statistics.median(prefills[i]))
            steps, bandwidths = [[] for _ in models], []
            for s in range(new - 1):
                bandwidths.append(probe.read())
                for j in range(len(models)):
                    i = (j + s) % len(models)
                    t0 = time.perf_counter()
                    tokens[i].append(next(gens[i]))
                    steps[i].append(time.perf_counter() - t0)
            for i in range(len(models)):
                out["decode_tok_s"][i].append(1 / statistics.median(steps[i]))
            out["tokens"] = tokens
            bandwidths = bandwidths or [probe.read()]   # (one new token: no rounds)
            out["read_bandwidth"].append(statistics.median(bandwidths))
            out["read_bandwidth_range"].append([min(bandwidths), max(bandwidths)])
    return out


if __name__ == "__main__":
    main()
