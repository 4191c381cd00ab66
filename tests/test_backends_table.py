"""The backends benchmark's dtype table: ratios and rooflines paired within each repeat."""

from __future__ import annotations

import pytest

from gptcpu.bench import backends


def test_ratios_are_paired_within_each_repeat(monkeypatch, factory):
    """Memory speed drifts between repeats: each repeat's ratio uses that repeat's f32 and
    bandwidth, and the table shows their median (not the ratio of the medians)."""
    folder = factory.converted("gpt2", "f32")
    decode = {"f32": [10.0, 20.0, 12.0], "q8": [30.0, 40.0, 24.0]}     # per repeat: 3x, 2x, 2x
    bandwidth = [1e9, 2e9, 1e9]
    seen = []   # each repeat measures the bandwidth, then runs the dtypes in order

    def fake_run(args):
        if "--bandwidth" in args:
            seen.append([])
            return {"read_bandwidth": bandwidth[len(seen) - 1]}
        dt = ("f32", "q8")[len(seen[-1])]
        seen[-1].append(dt)
        r = len(seen) - 1
        return {"decode_tok_s": decode[dt][r], "prefill_tok_s": 100.0 * (r + 1), "tokens": [1, 2]}

    monkeypatch.setattr(backends, "run", fake_run)
    t = backends.dtype_table("gpt2", {"f32": folder, "q8": folder}, 2, 3, 8, 8)
    assert seen == [["f32", "q8"]] * 3
    q8 = t["rows"]["q8"]
    assert q8["decode"]["median"] == 30.0
    assert q8["decode_vs_f32"] == {"median": 2.0, "min": 2.0, "max": 3.0}   # the ratio of medians is 2.5
    from gptcpu.engine.info import account, config_of
    nbytes = account(config_of(str(folder)))["decode_bytes_per_token"]["q8"]
    per_repeat = [d / (b / nbytes) for d, b in zip(decode["q8"], bandwidth)]   # 30, 20, 24 x nbytes / 1e9
    assert q8["of_roofline"]["median"] == pytest.approx(per_repeat[2])             # unpaired: 30 x nbytes / 1e9
    assert q8["of_roofline"]["min"] == pytest.approx(per_repeat[1])
    assert "2.00x (2.00-3.00)" in backends.render([t], [])
