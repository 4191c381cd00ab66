"""gptcpu info: the accounting matches what transformers counts, from a config alone."""

from __future__ import annotations

import json

import pytest

from checkpoints import CONFIGS
from gptcpu.engine.info import account, config_of
from test_convert import run_cli


@pytest.mark.parametrize("name,params", [("gpt-j-6b", 6_050_882_784), ("gpt2-xl", 1_557_611_200),
                                         ("gpt2", 124_439_808)])
def test_parameter_counts_match_transformers(name, params):
    a = account(config_of(str(CONFIGS / f"{name}.json")))
    assert a["params"]["total"] == params


def test_counts_match_a_built_model(factory):
    model = factory.hf_model("gpt2-untied")  # untied head, odd vocab, explicit n_inner
    a = account(config_of(str(factory.checkpoint("gpt2-untied"))))
    assert a["params"]["total"] == sum(p.numel() for p in model.parameters())
    a = account(config_of(str(factory.converted("gptj-odd"))))
    assert a["params"]["total"] == sum(p.numel() for p in factory.hf_model("gptj-odd").parameters())


def test_gptj_kv_cache_and_bytes():
    a = account(config_of(str(CONFIGS / "gpt-j-6b.json")), bandwidth_gbps=30, ram_bytes=16 * 2**30)
    assert a["kv_bytes_per_token"]["f16"] == 458_752
    assert a["kv_bytes_per_token"]["f32"] == 2 * 458_752
    p = a["params"]
    # matrices at the dtype, norms and biases at f32
    vectors = p["norms"] + 28 * (16384 + 4096) + 50400  # fc_in/fc_out biases, lm_head bias
    assert a["weight_bytes"]["f16"] == 2 * (p["total"] - vectors) + 4 * vectors + 4 * 28 * 3 * 4096
    # f16 weights (12.1 GB) leave room for (16 GiB - 12.1 GB) / 458,752 f16 cache tokens
    assert a["kv_tokens_in_ram"]["f16+f16_cache"] == (16 * 2**30 - a["weight_bytes"]["f16"]) // 458_752
    # decode streams every matrix but the embedding table; 2 FLOPs per streamed weight
    assert a["flops_per_token"]["matmul"] == 2 * (p["total"] - p["embeddings"] - vectors)
    assert a["roofline_tokens_per_s"]["f16"] == pytest.approx(30e9 / a["decode_bytes_per_token"]["f16"])
    assert 2.5 < a["roofline_tokens_per_s"]["f16"] < 2.7


def test_info_cli_on_every_kind_of_input(factory):
    hf = run_cli("info", factory.checkpoint("gptj"), "--json")
    ours = run_cli("info", factory.converted("gptj"), "--json")
    assert hf.returncode == 0 and ours.returncode == 0, hf.stderr + ours.stderr
    assert json.loads(hf.stdout)["params"] == json.loads(ours.stdout)["params"]
    table = run_cli("info", CONFIGS / "gpt2.json")
    assert table.returncode == 0 and "124,439,808" in table.stdout
    bad = run_cli("info", "/nonexistent/folder")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
