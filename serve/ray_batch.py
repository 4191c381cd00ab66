"""`gptcpu batch --ray ADDR`: the offline path on a Ray cluster, with Ray Data.

The driver reads and validates the input (offline.read_requests), hands the requests to Ray Data
as JSON strings (one schema, whatever their prompts and fields), and `map_batches` runs them on
a pool of actors, each of which loads the model once (by mmap, from a path every node can read)
and runs a continuous batch over each block it gets. Results come back to the driver, which
writes them (offline.run). An actor that dies is restarted and its unfinished block retried;
the driver keeps one record per input line, so nothing is lost or written twice.
"""

from __future__ import annotations

import json
from typing import Iterator


class _Actor:
    def __init__(self, model_path: str, threads: int, max_batch: int, kv_cache: str | None = None):
        from .offline import Generator
        self.generator = Generator(model_path, threads, max_batch, kv_cache)

    def __call__(self, block: dict) -> dict:
        requests = [json.loads(r) for r in block["request"]]
        records = self.generator(requests)
        return {"line": [r["line"] for r in requests], "record": [json.dumps(rec) for rec in records]}


def connect(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address in (None, "local") else address, ignore_reinit_error=True,
                 log_to_driver=False)


def generate(todo: list[dict], model_path: str, address: str | None, actors: int, threads: int,
             max_batch: int, cpus_per_actor: float | None = None,
             kv_cache: str | None = None) -> Iterator[tuple[dict, dict]]:
    import ray

    if not todo:
        return
    connect(address)
    by_line = {r["line"]: r for r in todo}
    ds = ray.data.from_items([{"request": json.dumps(r)} for r in todo])
    # a fraction of a CPU per thread: a whole CPU per actor on a small cluster leaves none for
    # Ray Data's own tasks, and the pipeline stalls
    cpus = cpus_per_actor if cpus_per_actor is not None else 0.5 * threads
    out = ds.map_batches(_Actor, fn_constructor_args=(str(model_path), threads, max_batch, kv_cache),
                         batch_size=4 * max_batch, concurrency=actors, num_cpus=cpus, batch_format="numpy",
                         max_restarts=-1, max_task_retries=-1)
    for row in out.iter_rows():
        yield by_line[int(row["line"])], json.loads(row["record"])
