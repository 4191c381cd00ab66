"""The `gptcpu` command: a thin argparse layer over the library. No globals, no logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import GptcpuError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def default_model_record() -> Path:
    from gptcpu.convert import gptcpu_home
    return gptcpu_home() / "default-model"


EMBEDDED = Path(__file__).resolve().parent / "demo"  # the trained demo checkpoint (HF format)


def default_model() -> str:
    """$GPTCPU_MODEL, else the last model `gptcpu convert` wrote, else the embedded demo model
    (converted on first use into $GPTCPU_HOME/models/demo-f32)."""
    from gptcpu.convert import convert, gptcpu_home

    if os.environ.get("GPTCPU_MODEL"):
        return os.environ["GPTCPU_MODEL"]
    record = default_model_record()
    if record.exists() and Path(record.read_text().strip()).is_dir():
        return record.read_text().strip()
    if (EMBEDDED / "model.safetensors").exists():
        out = gptcpu_home() / "models" / "demo-f32"
        if not (out / "model.safetensors").exists():
            convert(str(EMBEDDED), out, dtype="f32", force=True, progress=False)
        return str(out)
    raise GptcpuError("no model: pass --model DIR, or convert one first (gptcpu convert SOURCE)")


def cmd_convert(args) -> None:
    from gptcpu.convert import convert

    out = convert(args.source, args.out, dtype=args.dtype, revision=args.revision, force=args.force,
                  progress=None if not args.quiet else False)
    record = default_model_record()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(str(out.resolve()) + "\n")
    print(out)


def cmd_info(args) -> None:
    from .info import account, config_of, render

    if args.system:
        from . import blas
        from .threads import describe, set_threads

        from .threads import available_cpus

        blas.use(args.backend, args.threading)
        set_threads(args.threads or available_cpus())
        from .kernels import warm_up
        warm_up()
        print("\n".join(describe()))
        if not args.model:
            return
    elif not args.model:
        raise GptcpuError("info needs a MODEL (or --system)")
    ram = int(args.ram * 2**30) if args.ram else None
    a = account(config_of(args.model), args.bandwidth, ram)
    print(json.dumps(a, indent=2) if args.json else render(a))


def compiling():
    """A context in which numba's compile time is measured (compiles only: cache loads and
    runs fire no compile event) -> its TimingListener; read it with compiled_seconds."""
    from numba.core.event import TimingListener, install_listener

    return install_listener("numba:compile", TimingListener())


def compiled_seconds(listener) -> float:
    return listener.duration if listener.done else 0.0


def cmd_generate(args) -> None:
    from .model import load
    from .tokenizer import TextStream

    t0 = time.perf_counter()
    model = load(args.model or default_model(), threads=args.threads, backend=args.backend,
                 threading=args.threading, kv_cache=args.kv_cache)
    if model.tokenizer is None:
        raise GptcpuError(f"{model.path} has no tokenizer.json")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ids = model.tokenizer.encode(prompt)
    if not ids and model.config.bos_token_id is not None:
        ids = [model.config.bos_token_id]  # an empty prompt starts from <|endoftext|>
    t_load = time.perf_counter() - t0
    stream = TextStream(model.tokenizer, args.stop)
    out = sys.stdout
    if args.echo:
        out.write(prompt)
    t_start = time.perf_counter()
    t_first, n = None, 0
    with compiling() as compiled:   # numba compiles each kernel once per machine (then loads its cache)
        for token in model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, seed=args.seed, stop=args.stop,
                                    repetition_penalty=args.repetition_penalty, truncate=args.truncate):
            n += 1
            if t_first is None:
                t_first, c_first = time.perf_counter(), compiled_seconds(compiled)
            out.write(stream.push(token))
            out.flush()
    out.write(stream.finish() + "\n")
    out.flush()
    if args.verbose:
        t_end = time.perf_counter()
        first = (t_first - t_start) if t_first else 0.0
        prefill = len(ids) / (first - c_first) if t_first else 0.0
        c_all = compiled_seconds(compiled)
        decode = (n - 1) / (t_end - t_first - (c_all - c_first)) if n > 1 else 0.0
        print(f"load {t_load * 1000:.0f} ms | prompt {len(ids)} tokens, time to first token "
              f"{first * 1000:.0f} ms ({prefill:.1f} tok/s) | {n} new tokens, decode "
              f"{decode:.1f} tok/s", file=sys.stderr)
        if c_all:
            print(f"  (the first run on this machine: {c_all:.1f} s went to compiling the kernels, "
                  f"left out of the rates above; numba caches them for the next run)", file=sys.stderr)
        print(f"  weights {model.config.dtype}, KV cache {model.kv_cache}", file=sys.stderr)
        from .threads import describe
        for line in describe():
            print(f"  {line}", file=sys.stderr)


def cmd_eval(args) -> None:
    from .evaluate import evaluate
    from .model import load

    model = load(args.model, threads=args.threads, backend=args.backend, threading=args.threading)
    r = evaluate(model, args.files, stride=args.stride)
    if args.json:
        print(json.dumps({"model": str(args.model), "dtype": model.config.dtype, **r.as_dict()}))
    else:
        print(f"{r.tokens:,} tokens ({r.bytes:,} bytes): perplexity {r.perplexity:.4f}, "
              f"{r.bits_per_byte:.4f} bits per byte ({model.config.dtype})")


def cmd_serve(args) -> None:
    from .model import load

    try:
        import fastapi, prometheus_client, uvicorn  # noqa: F401
    except ImportError as e:
        raise GptcpuError(f"gptcpu serve needs the serve extra ({e.name} is missing): "
                          "pip install 'gptcpu[serve]'") from None
    from gptcpu.serve import serve

    if args.max_batch < 1 or args.max_queue < 1 or args.prefill_chunk < 1:
        raise GptcpuError("--max-batch, --max-queue and --prefill-chunk must be at least 1")
    api_key = args.api_key or os.environ.get("GPTCPU_API_KEY") or None
    if args.ray:
        _need_ray()
        from gptcpu.serve.ray_serve import run
        run(str(Path(args.model or default_model()).resolve()), address=args.address, host=args.host, port=args.port,
            threads=args.threads_per_replica, replicas=args.replicas, min_replicas=args.min_replicas,
            max_replicas=args.max_replicas, name=args.model_name, max_batch=args.max_batch, max_queue=args.max_queue,
            prefill_chunk=args.prefill_chunk, api_key=api_key, kv_cache=args.kv_cache)
        return
    model = load(args.model or default_model(), threads=args.threads, backend=args.backend,
                 threading=args.threading, kv_cache=args.kv_cache)
    serve(model, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
          log_level=args.log_level, name=args.model_name, max_batch=args.max_batch, max_queue=args.max_queue,
          prefill_chunk=args.prefill_chunk, api_key=api_key)


def _need_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise GptcpuError("--ray needs the ray extra: pip install 'gptcpu[ray]'") from None


def cmd_batch(args) -> None:
    from gptcpu.serve.offline import run

    if args.max_batch < 1 or args.actors < 1:
        raise GptcpuError("--max-batch and --actors must be at least 1")
    if not Path(args.input).is_file():
        raise GptcpuError(f"{args.input} is not a file")
    if args.ray:
        _need_ray()
    model = str(Path(args.model or default_model()).resolve())
    r = run(args.input, args.output, model, threads=args.threads, max_batch=args.max_batch, ray_address=args.ray,
            actors=args.actors, progress=not args.quiet, kv_cache=args.kv_cache)
    print(f"{r['prompts']} prompts: {r['done_before']} done before, {r['generated']} generated, {r['errors']} errors "
          f"-> {args.output}", file=sys.stderr)


def cmd_bench(args) -> None:
    import importlib.util

    from gptcpu.bench.compare import STACKS, run
    from gptcpu.engine import blas

    args.backend = args.backend or blas.default_backend()   # what generate would run here
    for what, given, known in (("stack", args.stacks, STACKS), ("dtype", args.dtypes, ["f32", "bf16", "f16", "q8"]),
                               ("backend", args.backend, ["openblas", "mkl"])):
        bad = [x for x in given.split(",") if x not in known]
        if bad:
            raise GptcpuError(f"unknown {what} {bad[0]!r}: choose from {', '.join(known)}")
    needed = ["torch", "transformers"]   # the reference stack, the export, the standard models
    if any(s.startswith("ort") for s in args.stacks.split(",")):
        needed += ["onnxruntime", "onnxscript"]
    if args.plot:
        needed.append("matplotlib")
    for module in needed:
        if importlib.util.find_spec(module) is None:
            raise GptcpuError(f"gptcpu bench needs the bench extra ({module} is missing): pip install 'gptcpu[bench]'")
    run(args)


def add_pool_flags(p) -> None:
    from .blas import BACKENDS, THREADINGS

    p.add_argument("--threads", type=int,
                   help="threads for the BLAS and the kernels (default: the CPUs this process may use, "
                        "a container's CPU quota included)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="BLAS for prefill's f32 GEMMs, and bf16's on a CPU with AMX-BF16 with mkl (default: "
                        "$GPTCPU_BACKEND, else mkl on an Intel CPU where the mkl extra is installed, else openblas)")
    p.add_argument("--threading", choices=THREADINGS,
                   help="threading layer of MKL and the kernels (default: $GPTCPU_THREADING or numba's choice)")


def add_kv_flag(p) -> None:
    p.add_argument("--kv-cache", choices=["f32", "f16"],
                   help="KV cache storage (default: f32 for f32 weights, f16 for bf16, f16 and q8)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gptcpu", description="Run GPT-J and GPT-2 checkpoints on CPUs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("convert", help="a Hugging Face checkpoint (hub id or folder) -> a gptcpu model folder")
    c.add_argument("source", help="hub id (EleutherAI/gpt-j-6b) or local folder")
    c.add_argument("--out", type=Path, help="output folder (default: $GPTCPU_HOME/models/NAME-DTYPE)")
    c.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8"], default="f16",
                   help="storage type of the weight matrices; norms and biases stay f32; q8 is int8 "
                        "with an f32 scale per output channel")
    c.add_argument("--revision", help="hub branch, tag or commit")
    c.add_argument("--force", action="store_true", help="replace a non-empty --out")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(run=cmd_convert)

    i = sub.add_parser("info", help="parameters, bytes, FLOPs and KV cache of a model, from its config")
    i.add_argument("model", nargs="?", help="gptcpu folder, Hugging Face folder, config.json or hub id")
    i.add_argument("--system", action="store_true",
                   help="the BLAS, threading layers and thread counts in effect (with --backend/--threading/--threads)")
    add_pool_flags(i)
    i.add_argument("--bandwidth", type=float, default=30.0, metavar="GBPS",
                   help="memory read bandwidth for the roofline (default 30)")
    i.add_argument("--ram", type=float, metavar="GIB", help="RAM for the KV-cache budget (default: this machine's)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(run=cmd_info)

    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    g.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    g.add_argument("--model", help="gptcpu model folder (default: the last converted, or $GPTCPU_MODEL)")
    add_pool_flags(g)
    add_kv_flag(g)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, help="for reproducible sampling")
    g.add_argument("--stop", action="append", help="stop at this string (repeatable); it is not printed")
    g.add_argument("--truncate", choices=["left"], help="cut a prompt longer than the context from the left")
    g.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    g.add_argument("--verbose", "-v", action="store_true", help="timings and thread pools on stderr")
    g.set_defaults(run=cmd_generate)

    s = sub.add_parser("serve", help="the OpenAI HTTP API (completions, chat) with continuous batching")
    s.add_argument("--model", help="gptcpu model folder (default: as for generate)")
    s.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    add_pool_flags(s)
    add_kv_flag(s)
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="sequences waiting for a place in the batch before requests get 429 (default 64)")
    s.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt tokens prefilled per step, so running streams are never stalled longer")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $GPTCPU_API_KEY, else none)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may finish in after SIGTERM (default 30)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--ray", action="store_true", help="deploy on Ray Serve (the ray extra)")
    s.add_argument("--address", help="with --ray: join this Ray cluster (default: start a local one)")
    s.add_argument("--replicas", type=int, default=1, help="with --ray: replicas of the engine (default 1)")
    s.add_argument("--threads-per-replica", type=int, default=1, help="with --ray: CPUs and threads of each replica")
    s.add_argument("--min-replicas", type=int, help="with --ray: autoscale from this many")
    s.add_argument("--max-replicas", type=int, help="with --ray: autoscale up to this many")
    s.set_defaults(run=cmd_serve)

    o = sub.add_parser("batch", help="offline generation for a JSONL file of prompts (resumable; --ray to scale out)")
    o.add_argument("input", help="JSONL: one {\"id\", \"prompt\", sampling fields...} a line")
    o.add_argument("output", help="JSONL results, in input order; ids already there are skipped")
    o.add_argument("--model", help="gptcpu model folder (default: as for generate)")
    o.add_argument("--threads", type=int, help="threads of the engine (of each actor with --ray; default 1 there)")
    o.add_argument("--max-batch", type=int, default=8, help="sequences generated together (default 8)")
    add_kv_flag(o)
    o.add_argument("--ray", nargs="?", const="local", metavar="ADDR",
                   help="run on Ray Data's actor pool: a cluster address, or none for a local Ray")
    o.add_argument("--actors", type=int, default=1, help="with --ray: actors, each loading the model once")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.set_defaults(run=cmd_batch)

    b = sub.add_parser("bench", help="gptcpu vs onnxruntime vs transformers (torch CPU) on the same weights")
    from gptcpu.bench.compare import add_arguments
    add_arguments(b)
    b.set_defaults(run=cmd_bench)

    e = sub.add_parser("eval", help="perplexity and bits per byte of a model over text files")
    e.add_argument("model", help="gptcpu model folder")
    e.add_argument("files", nargs="+", help="UTF-8 text files")
    e.add_argument("--stride", type=int, help="tokens the window slides by (default: half the context)")
    add_pool_flags(e)
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(run=cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except GptcpuError as e:
        print(f"gptcpu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptcpu: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet exit under `| head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
