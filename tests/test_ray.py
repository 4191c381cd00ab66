"""Ray: `gptcpu batch --ray` and `gptcpu serve --ray` on a real local cluster, a head and a
worker node started with `ray start` (2 CPUs in all), torn down with `ray stop`."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gptcpu.bench.serve import free_port, wait_healthy

# `ray start` clusters authenticate with a token: one for this test session, shared by the
# nodes, the gptcpu processes and this one (ray.init in the fault tests). Ray reads it when
# imported, so it is set first.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(AUTH)
ray = pytest.importorskip("ray", reason="the ray extra (ray[serve,data]) is not installed")
pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
pytest.importorskip("ray.data", reason="ray[data] is not installed")

RAY = str(Path(sys.executable).parent / "ray")
ENV = dict(os.environ)


def ray_cli(*args):
    r = subprocess.run([RAY, *args], env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def cluster():
    subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True, timeout=120)
    port = free_port()
    node = ["--num-cpus=1", f"--memory={3 << 30}", f"--object-store-memory={300 << 20}"]
    ray_cli("start", "--head", f"--port={port}", "--include-dashboard=false", "--disable-usage-stats", *node)
    address = f"127.0.0.1:{port}"
    try:
        ray_cli("start", f"--address={address}", *node)
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True, timeout=180)


def requests_file(path: Path, n: int, max_tokens: int = 12) -> None:
    lines = [json.dumps({"id": i, "prompt": f"def f{i}(x):\n", "max_tokens": max_tokens, "temperature": 0.8,
                         "seed": i}) for i in range(n)]
    lines.insert(3, "{broken")
    path.write_text("\n".join(lines) + "\n")


def batch_cli(*args):
    r = subprocess.run([sys.executable, "-m", "gptcpu.engine.cli", "batch", *map(str, args)], env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_batch_on_the_cluster_equals_in_process(cluster, demo_f32, tmp_path):
    inp = tmp_path / "in.jsonl"
    requests_file(inp, 12)
    batch_cli(inp, tmp_path / "local.jsonl", "--model", demo_f32, "--threads", "1", "--quiet")
    batch_cli(inp, tmp_path / "ray.jsonl", "--model", demo_f32, "--threads", "1", "--quiet", "--ray", cluster,
              "--actors", "2")
    local = (tmp_path / "local.jsonl").read_text().splitlines()
    assert (tmp_path / "ray.jsonl").read_text().splitlines() == local
    assert len(local) == 13 and "error" in json.loads(local[3])


def processes(title: str) -> list[int]:
    """Pids of the processes whose command line (Ray's process title: ray::ClassName...) has title."""
    r = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True)
    return [int(line.split(None, 1)[0]) for line in r.stdout.splitlines() if title in line]


def test_an_actor_killed_mid_batch_loses_and_duplicates_nothing(cluster, demo_f32, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests_file(inp, 40, max_tokens=60)
    proc = subprocess.Popen([sys.executable, "-m", "gptcpu.engine.cli", "batch", str(inp), str(out), "--model",
                             str(demo_f32), "--threads", "1", "--quiet", "--ray", cluster, "--actors", "2"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline and proc.poll() is None:
        workers = processes("MapWorker")
        if workers and out.exists() and out.stat().st_size > 0:   # working: some records are out
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    _, stderr = proc.communicate(timeout=600)
    assert killed is not None, "no map actor was seen working: " + stderr[-2000:]
    assert proc.returncode == 0, stderr[-3000:]
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r.get("id") for r in records] == [*range(3), None, *range(3, 40)]
    assert all("text" in r for i, r in enumerate(records) if i != 3)


def test_serve_on_ray_answers_and_survives_a_replica_kill(cluster, demo_f32, demo_engine):
    import openai

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gptcpu.engine.cli", "serve", "--ray", "--address", cluster,
                             "--model", str(demo_f32), "--model-name", "demo", "--port", str(port), "--replicas", "2",
                             "--threads-per-replica", "1"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 240)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        m = demo_engine
        ids = m.tokenizer.encode("def fib(n):")
        expected = m.tokenizer.decode(list(m.generate(ids, 16)))
        r = client.completions.create(model="demo", prompt="def fib(n):", max_tokens=16, temperature=0)
        assert r.choices[0].text == expected

        ray.init(address=cluster, ignore_reinit_error=True, log_to_driver=False)
        try:
            def replicas():
                return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                              if a["namespace"] == "serve" and "REPLICA" in a["name"] and "gptcpu" in a["name"])

            before = replicas()
            assert len(before) == 2, before
            def in_flight():   # requests running while the replica dies (those it held may fail)
                for _ in range(2):
                    try:
                        client.completions.create(model="demo", prompt="import", max_tokens=200, temperature=0.8)
                    except openai.APIError:
                        pass

            busy = threading.Thread(target=in_flight)
            busy.start()
            time.sleep(0.3)
            ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
            answered = 0
            for _ in range(10):   # the other replica answers while the controller replaces this one
                r = client.completions.create(model="demo", prompt="def fib(n):", max_tokens=16, temperature=0)
                answered += r.choices[0].text == expected
            assert answered == 10
            busy.join(timeout=120)
            deadline = time.time() + 120
            while time.time() < deadline:
                now = replicas()
                if len(now) == 2 and before[0] not in now:
                    break
                time.sleep(1)
            else:
                pytest.fail(f"the killed replica was not replaced: {replicas()}")
        finally:
            ray.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)   # takes the deployment down and exits 0
        try:
            assert proc.wait(timeout=120) == 0, proc.stdout.read()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
            subprocess.run([sys.executable, "-c", "import ray; from ray import serve; "
                            f"ray.init(address='{cluster}'); serve.shutdown()"], env=ENV, capture_output=True,
                           timeout=120)
