"""`gptcpu batch INPUT.jsonl OUTPUT.jsonl`: offline generation for many prompts, resumable.

Each input line is a JSON object: `id` (a string or number, unique), `prompt` (text or token
ids) and optional sampling fields with the API's names (max_tokens, temperature, top_p, top_k,
seed, stop, repetition_penalty, presence_penalty, frequency_penalty). Each output line is
{"id", "text", "finish_reason", "usage"} or, for a line that could not be parsed or generated,
{"id", "line", "error"}: never a crash. Results are appended as they finish, so an interrupted
run loses nothing; a re-run with the same OUTPUT skips the ids already done and retries the
errors; at the end OUTPUT is rewritten in input order, one line per input line.

`Generator` does the work for a list of requests (a continuous batch over them, the model loaded
once); the in-process path calls it directly, the Ray path (ray_batch.py) from an actor pool.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from gptcpu.engine.errors import GptcpuError

DEFAULTS = {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": None,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
NUMBERS = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int,
           "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float}


def key_of(record: dict) -> str:
    return f"id:{json.dumps(record['id'])}" if record.get("id") is not None else f"line:{record['line']}"


def read_requests(path: Path) -> list[dict]:
    """Every non-blank line -> a request {"id", "line", "prompt", "sampling"} or an error record."""
    out, seen = [], set()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GptcpuError(f"cannot read {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        out.append(_parse(line, n, seen))
    return out


def _parse(line: str, n: int, seen: set) -> dict:
    def error(message, id_=None):
        return {"id": id_, "line": n, "error": message}

    try:
        obj = json.loads(line)
    except ValueError as e:
        return error(f"not JSON: {e}")
    if not isinstance(obj, dict):
        return error("not a JSON object")
    rid = obj.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return error("no id (a string or an integer)")
    if json.dumps(rid) in seen:
        return error(f"duplicate id {rid!r}", rid)
    seen.add(json.dumps(rid))
    prompt = obj.get("prompt")
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt))):
        return error("prompt must be text or a list of token ids", rid)
    sampling = dict(DEFAULTS)
    for name, value in obj.items():
        if name in ("id", "prompt"):
            continue
        if name not in DEFAULTS:
            return error(f"unknown field {name!r}", rid)
        kind = NUMBERS.get(name)
        if kind is not None and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
                return error(f"{name} must be {'an integer' if kind is int else 'a number'}", rid)
        if name == "stop" and not (value is None or isinstance(value, str)
                                   or (isinstance(value, list) and all(isinstance(s, str) for s in value))):
            return error("stop must be a string or a list of strings", rid)
        sampling[name] = value if value is not None else DEFAULTS[name]
    return {"id": rid, "line": n, "prompt": prompt, "sampling": sampling}


class Generator:
    """A loaded model that turns a list of requests into result records (one continuous batch)."""

    def __init__(self, model_path: str, threads: int | None = None, max_batch: int = 8, kv_cache: str | None = None):
        import gptcpu
        self.model = gptcpu.load(model_path, threads=threads, kv_cache=kv_cache)
        if self.model.tokenizer is None:
            raise GptcpuError(f"{model_path} has no tokenizer.json")
        self.max_batch = max_batch

    def __call__(self, requests: list[dict]) -> list[dict]:
        """-> one record per request, in order."""
        out = dict(self.stream(requests))
        return [out[i] for i in range(len(requests))]

    def stream(self, requests: list[dict]) -> Iterator[tuple[int, dict]]:
        """(index, record) of each request as it finishes, up to max_batch generating at once."""
        from gptcpu.engine.batch import Batch, Member, Sampling

        m = self.model
        waiting = []
        for i, r in enumerate(requests):
            s = r["sampling"]
            try:
                ids = m.tokenizer.encode(r["prompt"]) if isinstance(r["prompt"], str) else r["prompt"]
                ids = ids or [m.config.bos_token_id or 0]
                sampling = Sampling(max_new_tokens=s["max_tokens"], temperature=s["temperature"], top_k=s["top_k"],
                                    top_p=s["top_p"], seed=s["seed"], stop=s["stop"],
                                    repetition_penalty=s["repetition_penalty"], presence_penalty=s["presence_penalty"],
                                    frequency_penalty=s["frequency_penalty"])
                waiting.append((i, Member(m, ids, sampling)))
            except (GptcpuError, ValueError, TypeError, OverflowError) as e:
                yield i, {"id": r["id"], "line": r["line"], "error": str(e)}
        batch = Batch(m, max_batch=self.max_batch, prefill_chunk=256)
        running: dict[int, int] = {}   # id(member) -> request index
        while waiting or batch:
            while waiting and batch.free:
                i, member = waiting.pop(0)
                batch.add(member)
                running[id(member)] = i
            members = list(batch.members)
            batch.step()
            for member in members:
                if member.finish is not None:
                    i = running.pop(id(member))
                    yield i, {"id": requests[i]["id"], **self.result(member)}

    def result(self, member) -> dict:
        from gptcpu.engine.tokenizer import TextStream

        stream = TextStream(self.model.tokenizer, member.sampling.stop)
        text = "".join(stream.push(t) for t in member.output) + stream.finish()
        n_prompt, n_out = len(member.prompt), len(member.output)
        return {"text": text, "finish_reason": member.finish,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}


def read_done(path: Path) -> dict[str, dict]:
    """The successful records already in an output file, by id (a torn last line is ignored)."""
    done = {}
    if not Path(path).exists():
        return done
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "error" not in rec and rec.get("id") is not None:
            done[json.dumps(rec["id"])] = rec
    return done


def run(input_path, output_path, model_path: str, threads: int | None = None, max_batch: int = 8,
        ray_address: str | None = None, actors: int = 1, progress: bool = True, kv_cache: str | None = None) -> dict:
    """Generate for every request of input_path not yet done in output_path -> counts."""
    from tqdm import tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    requests = read_requests(input_path)
    done = read_done(output_path)
    results: dict[int, dict] = {}    # input line -> record
    todo = []
    for r in requests:
        if "error" in r:
            results[r["line"]] = r
        elif json.dumps(r["id"]) not in done:
            todo.append(r)
    already = len(requests) - len(todo) - len(results)   # done in an earlier run
    results.update({r["line"]: done[json.dumps(r["id"])] for r in requests
                    if "error" not in r and json.dumps(r["id"]) in done})
    if ray_address is None:   # load the model before anything is written
        source = ((todo[i], rec) for i, rec in Generator(model_path, threads, max_batch, kv_cache).stream(todo))
    else:
        from .ray_batch import connect, generate
        connect(ray_address)
        source = generate(todo, model_path, ray_address, actors, threads or 1, max_batch, kv_cache=kv_cache)
    with open(output_path, "a", encoding="utf-8") as out, \
            tqdm(total=len(requests), initial=len(requests) - len(todo), unit="prompt", disable=not progress,
                 desc="gptcpu batch") as bar:
        if out.tell() and not output_path.read_bytes().endswith(b"\n"):
            out.write("\n")   # after a torn last line (an interrupted write)
        for r in results.values():
            if "error" in r:
                out.write(json.dumps(r) + "\n")
        for request, rec in source:
            if request["line"] in results and "error" not in results[request["line"]]:
                continue   # a retried task's duplicate
            results[request["line"]] = rec
            out.write(json.dumps(rec) + "\n")
            out.flush()
            bar.update()
    tmp = output_path.with_name(output_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(results[r["line"]]) + "\n" for r in requests), encoding="utf-8")
    os.replace(tmp, output_path)
    errors = sum("error" in rec for rec in results.values())
    return {"prompts": len(requests), "done_before": already, "generated": len(requests) - already - errors,
            "errors": errors}
