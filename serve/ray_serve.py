"""`gptcpu serve --ray`: the same FastAPI app as `gptcpu serve`, as a Ray Serve deployment.

Each replica builds the app (serve.ingress with a builder, evaluated on the replica): it loads
the model by mmap from a path every node can read, with `threads` threads, and runs its own
continuous batcher. Ray Serve's proxy spreads requests over the replicas; with --min-replicas /
--max-replicas its autoscaler adds replicas as the ongoing requests per replica pass max_batch.
"""

from __future__ import annotations


def build_app(model_path: str, threads: int, name: str | None, max_batch: int, max_queue: int,
              prefill_chunk: int, api_key: str | None, kv_cache: str | None = None):
    import gptcpu
    from gptcpu.serve import create_app

    model = gptcpu.load(model_path, threads=threads, kv_cache=kv_cache)
    return create_app(model, name=name, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                      api_key=api_key)


def application(model_path: str, threads: int = 1, replicas: int = 1, min_replicas: int | None = None,
                max_replicas: int | None = None, name: str | None = None, max_batch: int = 8, max_queue: int = 64,
                prefill_chunk: int = 128, api_key: str | None = None, kv_cache: str | None = None):
    """-> a bound Ray Serve application (serve.run it)."""
    from pathlib import Path

    from ray import serve

    path = str(Path(model_path).resolve())

    def builder():  # a function of no arguments: Ray Serve calls it on each replica
        return build_app(path, threads, name, max_batch, max_queue, prefill_chunk, api_key, kv_cache)

    class GptcpuReplica:
        pass

    options = {"ray_actor_options": {"num_cpus": threads}, "max_ongoing_requests": max_batch + max_queue}
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": max(lo, max_replicas or lo),
                                         "initial_replicas": max(lo, min(replicas, max_replicas or replicas)),
                                         "target_ongoing_requests": max_batch}
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(serve.ingress(builder)(GptcpuReplica), name="gptcpu", **options)
    return deployment.bind()


def run(model_path: str, address: str | None = None, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Start (or join, with address) a Ray cluster, deploy, and serve until Ctrl-C or SIGTERM,
    which take the deployment down again (a local cluster goes with the process)."""
    import signal

    import ray
    from ray import serve

    def stop(signum, frame):
        raise KeyboardInterrupt

    ray.init(address=address, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    signal.signal(signal.SIGTERM, stop)   # after ray.init, which installs its own handler
    try:
        serve.run(application(model_path, **options), name="gptcpu", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete("gptcpu")
