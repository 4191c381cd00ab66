"""`gptcpu serve` as its users meet it: a live server on 127.0.0.1 (the real CLI in a subprocess)
spoken to with the official `openai` client, raw HTTP, schemathesis and a load test."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gptcpu.bench.serve import free_port, wait_healthy

openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")

KEY = "sk-gptcpu-test"
NAME = "demo"


class Server:
    def __init__(self, model_dir, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptcpu.engine.cli", "serve", "--model", str(model_dir), "--model-name", NAME,
             "--port", str(self.port), "--threads", "1", "--log-level", "warning", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_healthy(self.url, self.proc, 120)

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def terminate(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def server(demo_f32):
    s = Server(demo_f32, "--api-key", KEY, "--max-batch", "4", "--max-queue", "16")
    yield s
    rc, out = s.terminate()
    assert rc == 0, out
    assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def reference(engine, prompt, max_tokens, **sampling):
    """What the engine alone generates for a prompt -> (text, finish_reason)."""
    ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    out = list(engine.generate(ids, max_tokens, **sampling))
    finish = "stop" if out[-1] == engine.config.eos_token_id else "length"
    return engine.tokenizer.decode(out), finish


PROMPT = "import os\n\n\ndef main(argv):\n"


# -- the API as the openai client sees it ---------------------------------------------------------

def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).owned_by == "gptcpu"


def test_greedy_completion_equals_the_engine(client, demo_engine):
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0)
    text, finish = reference(demo_engine, PROMPT, 40)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == NAME
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish
    n_prompt = len(demo_engine.tokenizer.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (n_prompt, n_prompt + r.usage.completion_tokens)


def test_seeded_sampling_is_reproducible_and_equals_the_engine(client, demo_engine):
    kw = dict(model=NAME, prompt="class Parser:", max_tokens=30, temperature=0.9, top_p=0.95, seed=11,
              extra_body={"top_k": 40})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    text, _ = reference(demo_engine, "class Parser:", 30, temperature=0.9, top_p=0.95, top_k=40, seed=11)
    assert a.choices[0].text == text
    other = client.completions.create(**{**kw, "seed": 12})
    assert other.choices[0].text != a.choices[0].text


def test_token_prompts_and_lists_of_prompts(client, demo_engine):
    ids = demo_engine.tokenizer.encode("def fib(n):")
    other = demo_engine.tokenizer.encode("import sys")
    r = client.completions.create(model=NAME, prompt=[ids, other], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == reference(demo_engine, ids, 8)[0]
    assert r.choices[2].text == reference(demo_engine, other, 8)[0]
    assert r.usage.prompt_tokens == len(ids) + len(other)
    texts = client.completions.create(model=NAME, prompt=["def fib(n):", "import sys"], max_tokens=8, temperature=0)
    assert [c.text for c in texts.choices] == [r.choices[0].text, r.choices[2].text]


def test_stop_strings_cut_the_text(client, demo_engine):
    full, _ = reference(demo_engine, PROMPT, 40)
    stop = full[full.index("\n", 1):][:3]      # something the greedy text really contains
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]


def test_streaming_equals_the_whole_response(client):
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0.7, seed=3)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat(client, demo_engine):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Write a parser."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=25, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant"
    prompt = "You write Python.\n\nUser: Write a parser.\nAssistant:"   # the documented plain template
    text, _ = reference(demo_engine, prompt, 25, stop=["\nUser:"])
    assert msg.content == text.split("\nUser:")[0]
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=25, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_logprobs_and_echo(client, demo_engine):
    r = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=5, temperature=0, logprobs=2, echo=True)
    c = r.choices[0]
    n_prompt = len(demo_engine.tokenizer.encode("def f(x):"))
    assert c.text.startswith("def f(x):")
    assert len(c.logprobs.tokens) == n_prompt + 5 and c.logprobs.token_logprobs[0] is None
    assert "".join(c.logprobs.tokens) == c.text
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs[1:])
    assert all(len(top) == 2 for top in c.logprobs.top_logprobs[1:])
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].top_logprobs[0].logprob == content[0].logprob   # greedy took the most likely


# -- errors ------------------------------------------------------------------------------------------

def test_errors_raise_the_clients_exceptions(server, client, demo_engine):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="x", temperature="hot")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x " * 300, max_tokens=10)
    n = len(demo_engine.tokenizer.encode("x " * 300))
    assert "context length is 256 tokens" in str(e.value) and f"({n} in your prompt; 10 for" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "y " * 300}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model=NAME, prompt="x")
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])


def test_raw_bad_bodies_get_openai_errors(server):
    h = {"Authorization": f"Bearer {KEY}"}
    for body in (b"{not json", b"[]", b'{"model": "demo"}', b'{"model": "demo", "prompt": [1.5]}',
                 b'{"model": "demo", "prompt": [99999999]}', b'{"model": "demo", "prompt": "x", "n": 1000}'):
        r = httpx.post(server.url + "/v1/completions", content=body, headers={**h, "Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/nothing", headers=h).json()["error"]["message"]


def test_a_full_queue_answers_429(server, client):
    long = dict(model=NAME, max_tokens=200, temperature=0.8, seed=1)
    # 16 sequences: 4 run, 12 wait; the queue holds 16, so 5 more do not fit
    stream = client.completions.create(prompt=["a"] * 16, stream=True, **long)
    next(iter(stream))
    with pytest.raises(openai.RateLimitError):
        client.completions.create(prompt="b", n=5, **long)
    stream.close()


# -- batching ------------------------------------------------------------------------------------------

def test_concurrent_clients_each_get_their_single_request_tokens(server, client):
    prompts = [f"def f{i}(x):\n" for i in range(6)]
    kw = dict(model=NAME, max_tokens=30, temperature=0.8, top_p=0.9)
    alone = [client.completions.create(prompt=p, seed=i, **kw).choices[0].text for i, p in enumerate(prompts)]
    results = [None] * len(prompts)

    def run(i):
        results[i] = client.completions.create(prompt=prompts[i], seed=i, **kw).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    metrics = httpx.get(server.url + "/metrics").text
    batch_sizes = [line for line in metrics.splitlines() if line.startswith("gptcpu_batch_size")]
    assert batch_sizes


def test_a_client_that_disconnects_frees_its_place(server, client):
    stream = client.completions.create(model=NAME, prompt="import", max_tokens=240, temperature=0.8, stream=True)
    it = iter(stream)
    next(it), next(it)
    stream.close()
    deadline = time.time() + 5
    while httpx.get(server.url + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.01)
    assert httpx.get(server.url + "/health").json()["running"] == 0


def test_metrics_are_prometheus_text(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=NAME, prompt="x", max_tokens=3)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    for name in ("gptcpu_requests", "gptcpu_prompt_tokens", "gptcpu_generation_tokens", "gptcpu_queue_depth",
                 "gptcpu_batch_size", "gptcpu_time_to_first_token_seconds", "gptcpu_inter_token_latency_seconds"):
        assert name in families, name
    ok = [s for s in families["gptcpu_requests"].samples
          if s.labels.get("endpoint") == "/v1/completions" and s.labels.get("status") == "200"]
    assert ok and ok[0].value >= 1


def test_load_500_requests_16_at_a_time(server):
    async def main():
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     limits=limits, timeout=120) as http:
            gate = asyncio.Semaphore(16)

            async def one(i):
                async with gate:
                    body = {"model": NAME, "prompt": f"def g{i}(x):", "max_tokens": 8, "temperature": 0.8,
                            "seed": i, "stream": i % 2 == 0}
                    r = await http.post("/v1/completions", json=body)
                    return r.status_code, r.text

            return await asyncio.gather(*(one(i) for i in range(n)))

    n = 60
    asyncio.run(main())                     # warm up: allocator pools, caches
    before = server.rss()
    n = 500
    results = asyncio.run(main())
    after = server.rss()
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:3]
    assert all(text.endswith("data: [DONE]\n\n") for status, text in results[::2])
    assert after - before < 32 << 20, (before, after)


def test_schemathesis_finds_no_server_error(server):
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (test extra) is not installed")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures, calls = [], []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = NAME   # past the 404, into the request's handling
            r = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
            calls.append(r.status_code)
            if r.status_code >= 500:
                failures.append((operation.label, case.body, r.status_code, r.text[:300]))

        check()
    assert len(calls) > 50 and not failures, failures[:3]


# -- shutdown ------------------------------------------------------------------------------------------

def test_sigterm_ends_streams_cleanly_and_exits_0(demo_f32):
    s = Server(demo_f32, "--shutdown-timeout", "0.5")
    client = s.client()
    stream = client.completions.create(model=NAME, prompt="import", max_tokens=250, temperature=0.8,
                                       stream=True, extra_body={"top_k": 0})
    chunks = [next(iter(stream))]
    s.proc.send_signal(signal.SIGTERM)
    chunks += list(stream)                  # the client sees the stream end (the SDK reads [DONE])
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    out, _ = s.proc.communicate(timeout=60)
    assert s.proc.returncode == 0, out
    assert "Traceback" not in out, out
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health")
