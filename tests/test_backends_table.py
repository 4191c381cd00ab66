"""The backends benchmark's dtype table: ratios and rooflines paired within each repeat."""

from __future__ import annotations

import pytest

from gptcpu.bench import backends


def test_ratios_are_paired_within_each_repeat(monkeypatch, factory):
    """Memory speed drifts between repeats: each repeat's ratio uses that repeat's f32, each run's
    share of its roofline the bandwidth measured just before it, and the table shows their
    medians (not the ratio of the medians)."""
    folder = factory.converted("gpt2", "f32")
    decode = {"f32": [10.0, 20.0, 12.0], "q8": [30.0, 40.0, 24.0]}     # per repeat: 3x, 2x, 2x
    bandwidth = {"f32": [5e9, 5e9, 5e9], "q8": [1e9, 2e9, 1e9]}
    seen = []   # each repeat runs the dtypes in order, each after a bandwidth measurement

    def fake_run(args):
        i = sum(x != "bw" for x in seen)          # runs so far: the next is repeat i // 2, dtype i % 2
        dt, r = ("f32", "q8")[i % 2], i // 2
        if "--bandwidth" in args:
            seen.append("bw")
            return {"read_bandwidth": bandwidth[dt][r]}
        seen.append(dt)
        return {"decode_tok_s": decode[dt][r], "prefill_tok_s": 100.0 * (r + 1), "tokens": [1, 2]}

    monkeypatch.setattr(backends, "run", fake_run)
    t = backends.dtype_table("gpt2", {"f32": folder, "q8": folder}, 2, 3, 8, 8)
    assert seen == ["bw", "f32", "bw", "q8"] * 3
    q8 = t["rows"]["q8"]
    assert q8["decode"]["median"] == 30.0
    assert q8["decode_vs_f32"] == {"median": 2.0, "min": 2.0, "max": 3.0}   # the ratio of medians is 2.5
    from gptcpu.engine.info import account, config_of
    nbytes = account(config_of(str(folder)))["decode_bytes_per_token"]["q8"]
    per_run = [d / (b / nbytes) for d, b in zip(decode["q8"], bandwidth["q8"])]   # 30, 20, 24 x nbytes / 1e9
    assert q8["of_roofline"]["median"] == pytest.approx(per_run[2])                # unpaired: 30 x nbytes / 1e9
    assert q8["of_roofline"]["min"] == pytest.approx(per_run[1])
    assert t["read_bandwidth"]["median"] == 3.5e9   # of all six measurements
    assert "2.00x (2.00-3.00)" in backends.render([t], []) and ", OpenBLAS, " in backends.render([t], [])


def test_interleaved_ratios_and_roofline_of_its_rounds(monkeypatch, factory):
    """The interleaved table pairs each repeat's dtypes, and takes each repeat's roofline at the
    read bandwidth run_one measured in that repeat's rounds."""
    folder = factory.converted("gpt2", "f32")
    calls = []

    def fake_run(args):
        calls.append(args)
        return {"decode_tok_s": [[10.0, 20.0, 12.0], [30.0, 40.0, 24.0]],
                "prefill_tok_s": [[100.0, 100.0, 100.0], [90.0, 95.0, 80.0]],
                "tokens": [[1, 2], [1, 3]], "read_bandwidth": [2e9, 3e9, 1e9],
                "read_bandwidth_range": [[1e9, 4e9]] * 3}

    monkeypatch.setattr(backends, "run", fake_run)
    t = backends.interleaved_table("gpt2", {"f32": folder, "q8": folder}, 2, 3, 8, 8, backend="mkl")
    assert calls[0][:3] == ["--interleave", str(folder), str(folder)] and "--repeats" in calls[0]
    assert calls[0][calls[0].index("--backend") + 1] == "mkl"   # the BLAS the table says it ran on
    q8 = t["rows"]["q8"]
    assert q8["decode_vs_f32"] == {"median": 2.0, "min": 2.0, "max": 3.0}
    assert q8["prefill_vs_f32"]["median"] == 0.9
    from gptcpu.engine.info import account, config_of
    nbytes = account(config_of(str(folder)))["decode_bytes_per_token"]["q8"]
    per_repeat = [30.0 / (2e9 / nbytes), 40.0 / (3e9 / nbytes), 24.0 / (1e9 / nbytes)]
    assert q8["of_roofline"]["median"] == pytest.approx(sorted(per_repeat)[1])
    assert t["read_bandwidth"]["median"] == 2e9
    assert q8["same_tokens_as_f32"] is False and t["rows"]["f32"]["same_tokens_as_f32"] is True
    assert "interleaved in one process" in backends.render([t], []) and ", MKL, " in backends.render([t], [])


def test_run_one_interleaves_models_in_one_process(factory, monkeypatch):
    """Two real models, token by token in turn: every dtype gets its prefill (the median of its
    rounds), its decode steps per repeat and its tokens; the read bandwidth is read once a round of steps, its median per
    repeat (the probe stubbed: its file is 1 GiB)."""
    from gptcpu.bench import run_one, speed

    reads = iter(range(1, 100))

    class Probe:
        def __init__(self, threads, parts=1):
            assert parts == 4

        def read(self):
            return float(next(reads))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(speed, "ReadProbe", Probe)
    prefills, first_token_s = [], run_one.first_token_s
    monkeypatch.setattr(run_one, "first_token_s", lambda m, ids: prefills.append(m) or first_token_s(m, ids))
    folders = [str(factory.converted("gpt2", dt)) for dt in ("f32", "q8")]
    x = run_one.interleaved(folders, 1, 2, 6, 5, prefill_rounds=3)
    assert len(prefills) == 2 * 2 * 2 and len(set(map(id, prefills))) == 2   # 2 more a model a repeat
    assert [len(r) for r in x["decode_tok_s"]] == [2, 2] and all(v > 0 for r in x["decode_tok_s"] for v in r)
    assert [len(r) for r in x["prefill_tok_s"]] == [2, 2]
    assert [len(t) for t in x["tokens"]] == [5, 5]
    # four rounds (new tokens after the first) a repeat: reads 1-4, then 5-8
    assert x["read_bandwidth"] == [2.5, 6.5] and x["read_bandwidth_range"] == [[1.0, 4.0], [5.0, 8.0]]


def test_read_probe_reads_cold_slices_in_turn(tmp_path, monkeypatch):
    """ReadProbe cuts its file in slices and reads the next three each time (np.max, the BLAS
    GEMV, the kernel): with 4 slices no read is of a slice read in the last three."""
    from gptcpu.bench import speed

    monkeypatch.setenv("GPTCPU_BENCH_TMP", str(tmp_path))
    with speed.ReadProbe(1, nbytes=4 << 20, parts=4) as probe:
        assert [s.shape for s in probe.slices] == [(256, 1024)] * 4
        assert probe.read() > 0 and probe.read() > 0
        assert probe.next == 6
    assert speed.read_bandwidth(1, nbytes=4 << 20, repeats=2) > 0


def test_the_tables_say_which_cpu_they_come_from():
    from gptcpu.bench import backends

    cpu = backends.machine()
    assert cpu.endswith(" cores") and "(" in cpu   # model name (LLVM's name for it), N cores
    assert backends.render([], [], cpu).splitlines()[0] == f"Machine: {cpu}"
