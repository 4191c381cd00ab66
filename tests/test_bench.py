"""`gptcpu bench` end to end on tiny models: every stack runs, the report is well formed, and
onnxruntime's and torch's greedy tokens equal gptcpu's."""

from __future__ import annotations

import json

import pytest

from test_convert import run_cli

pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) is not installed")
pytest.importorskip("onnxscript", reason="onnxscript, torch.onnx's exporter (test extra), is not installed")


@pytest.mark.parametrize("shape,stacks,dtypes", [
    ("gpt2", "gptcpu,torch,torch-loop,ort,ort-opt,ort-int8", "f32,q8"),
    ("gptj", "gptcpu,torch,ort", "f32"),
])
def test_bench_runs_every_stack_and_they_agree(factory, tmp_path, shape, stacks, dtypes):
    source = factory.checkpoint(shape)
    out = tmp_path / "r.json"
    r = run_cli("bench", source, "--stacks", stacks, "--dtypes", dtypes, "--batch", "1,2", "--prompt", "8",
                "--new", "6", "--repeats", "1", "--threads", "1", "--work", tmp_path / "work", "--json", out,
                "--plot", tmp_path / "p.png", "--markdown", tmp_path / "r.md")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    labels = {x["label"] for x in rows}
    want = {"gptcpu f32", "transformers generate (f32)", "onnxruntime"}
    if "ort-opt" in stacks:
        want |= {"gptcpu q8", "transformers loop (f32)", "onnxruntime optimized", "onnxruntime int8"}
    assert want <= labels, labels
    assert not [x for x in rows if "error" in x], rows
    assert {x["batch"] for x in rows} == {1, 2}
    for x in rows:
        assert x["decode_tok_s"]["median"] > 0 and x["prefill_tok_s"]["median"] > 0
        assert x["peak_rss_mb"] > 10 and 0 < x["of_roofline"]
        if x["dtype"] == "f32":   # the same f32 weights: the same greedy tokens, in every row
            assert x["tokens_match"] == "6/6", x
    table = (tmp_path / "r.md").read_text()
    assert table.count("\n| ") == len(rows) + 2 and "onnxruntime" in table   # header, rule, rows
    from gptcpu.engine.blas import default_backend   # gptcpu's own choice here, named in the title
    assert result["backend"] == default_backend()
    assert f"gptcpu on {dict(openblas='OpenBLAS', mkl='MKL')[default_backend()]}" in table.splitlines()[0]
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert result["read_bandwidth"]["median"] > 1e8


def test_bench_bad_arguments_are_one_line_errors(tmp_path):
    from test_convert import assert_one_line_error

    assert_one_line_error(run_cli("bench", "gpt2", "--stacks", "gptcpu,tf"), "unknown stack 'tf'")
    assert_one_line_error(run_cli("bench", "gpt2", "--dtypes", "f8"), "unknown dtype 'f8'")
    assert_one_line_error(run_cli("bench", "gpt2", "--backend", "blis"), "unknown backend 'blis'")
    assert_one_line_error(run_cli("bench", tmp_path / "nope", "--stacks", "gptcpu"), "nope")


def test_bench_prompt_past_the_context_is_one_line_error(factory, tmp_path):
    from test_convert import assert_one_line_error

    source = factory.checkpoint("gpt2")
    n_ctx = json.loads((source / "config.json").read_text())["n_positions"]
    r = run_cli("bench", source, "--stacks", "gptcpu", "--dtypes", "f32", "--prompt", str(n_ctx - 3), "--new", "4",
                "--work", tmp_path / "work")
    assert_one_line_error(r, f"do not fit {source.name}'s context of {n_ctx}")
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").glob("gptcpu-*"))   # nothing converted
