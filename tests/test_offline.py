"""`gptcpu batch`: offline generation from JSONL, in process (the Ray path: test_ray.py)."""

from __future__ import annotations

import json
from pathlib import Path

from test_convert import assert_one_line_error, run_cli

GOOD = [
    {"id": "a", "prompt": "def fib(n):", "max_tokens": 12},
    {"id": 7, "prompt": "import os\n", "max_tokens": 9, "temperature": 0.8, "top_k": 40, "seed": 3},
    {"id": "c", "prompt": "class A:", "max_tokens": 20, "stop": ["\n\n"], "temperature": 0.7, "seed": 1},
    {"id": "d", "prompt": [40, 611, 340], "max_tokens": 5},
]


def write_input(path: Path) -> list[str]:
    lines = [json.dumps(GOOD[0]), "{not json", json.dumps({"prompt": "no id"}), json.dumps(GOOD[1]),
             "", json.dumps({"id": "a", "prompt": "again"}), json.dumps({"id": "e", "prompt": 5}),
             json.dumps({"id": "f", "prompt": "x", "tempreature": 1}), json.dumps(GOOD[2]),
             json.dumps({"id": "g", "prompt": "x " * 400, "max_tokens": 5}), json.dumps(GOOD[3])]
    path.write_text("\n".join(lines) + "\n")
    return [ln for ln in lines if ln.strip()]


def expected_text(engine, req) -> str:
    from gptcpu.engine.tokenizer import TextStream

    ids = engine.tokenizer.encode(req["prompt"]) if isinstance(req["prompt"], str) else req["prompt"]
    out = engine.generate(ids, req["max_tokens"], temperature=req.get("temperature", 0.0), top_k=req.get("top_k", 0),
                          seed=req.get("seed"), stop=req.get("stop"))
    stream = TextStream(engine.tokenizer, req.get("stop"))
    return "".join(stream.push(t) for t in out) + stream.finish()


def test_batch_keeps_every_line_in_order_with_errors_as_records(demo_f32, demo_engine, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = write_input(inp)
    r = run_cli("batch", inp, out, "--model", demo_f32, "--threads", "1", "--max-batch", "2")
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == len(lines)
    ids = [rec.get("id") for rec in records]
    assert ids == ["a", None, None, 7, "a", "e", "f", "c", "g", "d"]
    errors = {i: rec["error"] for i, rec in enumerate(records) if "error" in rec}
    assert set(errors) == {1, 2, 4, 5, 6, 8}
    assert "JSON" in errors[1] and "id" in errors[2] and "duplicate" in errors[4]
    assert "prompt" in errors[5] and "tempreature" in errors[6] and "context" in errors[8]
    by_id = {rec["id"]: rec for rec in records if "error" not in rec}
    for req in GOOD:
        rec = by_id[req["id"]]
        assert rec["text"] == expected_text(demo_engine, req), req
        assert rec["usage"]["completion_tokens"] <= req["max_tokens"]
        assert rec["finish_reason"] in ("stop", "length")


def test_batch_resumes_skipping_what_is_done(demo_f32, demo_engine, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp)
    assert run_cli("batch", inp, out, "--model", demo_f32, "--threads", "1", "--quiet").returncode == 0
    full = out.read_text().splitlines()
    # an interrupted run: two records written (one of them marked), the last line torn
    kept = [json.loads(full[0]), json.loads(full[3])]
    kept[0]["text"] = "DONE BEFORE"
    out.write_text("".join(json.dumps(k) + "\n" for k in kept) + '{"id": "c", "te')
    r = run_cli("batch", inp, out, "--model", demo_f32, "--threads", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    again = out.read_text().splitlines()
    assert len(again) == len(full)
    assert json.loads(again[0])["text"] == "DONE BEFORE"           # skipped, not regenerated
    assert [json.loads(x).get("id") for x in again] == [json.loads(x).get("id") for x in full]
    assert again[1:] == full[1:]
    assert "2 done before, 2 generated, 6 errors" in r.stderr


def test_batch_bad_arguments_are_one_line_errors(demo_f32, tmp_path):
    assert_one_line_error(run_cli("batch", tmp_path / "missing.jsonl", tmp_path / "o.jsonl", "--model", demo_f32),
                          "missing.jsonl")
    (tmp_path / "in.jsonl").write_text("{}\n")
    assert_one_line_error(run_cli("batch", tmp_path / "in.jsonl", tmp_path / "o.jsonl", "--model", tmp_path / "nope"),
                          "nope")


def test_batch_kv_cache_flag_reaches_the_engine(demo_f32, tmp_path):
    """--kv-cache f16 on an f32 model: the engine runs on an f16 cache (the Ray actors get the
    same Generator arguments), and the records are still whole."""
    from gptcpu.serve.offline import Generator

    assert Generator(str(demo_f32), 1, 2, "f16").model.kv_cache == "f16"
    assert Generator(str(demo_f32), 1, 2).model.kv_cache == "f32"
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(GOOD[0]) + "\n")
    r = run_cli("batch", inp, out, "--model", demo_f32, "--threads", "1", "--kv-cache", "f16", "--quiet")
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["id"] == "a" and rec["usage"]["completion_tokens"] >= 1 and rec["finish_reason"] in ("stop", "length")
