"""The OpenAI-compatible HTTP app: /v1/models, /v1/completions, /v1/chat/completions, /health,
/metrics. `create_app(model, ...)` builds it around a loaded Model; `serve(...)` runs it.

Every response and streamed chunk has OpenAI's shape. Errors use OpenAI's error body: 400 for a
bad body or parameter, 401 without the API key, 404 for an unknown model, 429 when the queue is
full, 503 while shutting down. Requests become `Member`s of the scheduler's continuous batch
(see scheduler.py); a client that goes away leaves it before the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gptcpu.engine.batch import Member, Sampling
from gptcpu.engine.errors import GptcpuError
from gptcpu.engine.model import check_ids
from gptcpu.engine.tokenizer import TextStream

from .chat import ChatTemplate
from .metrics import CountRequests, Metrics
from .protocol import ChatRequest, CompletionRequest, OpenAIError, unsupported
from .scheduler import Job, QueueFull, Scheduler


def create_app(model, name: str | None = None, max_batch: int = 8, max_queue: int = 64,
               prefill_chunk: int = 128, api_key: str | None = None) -> FastAPI:
    if model.tokenizer is None:
        raise GptcpuError(f"{model.path} has no tokenizer.json: the server needs one")
    name = name or (model.path.name if model.path else "gptcpu")
    metrics = Metrics()
    scheduler = Scheduler(model, max_batch, max_queue, prefill_chunk, metrics)
    template = ChatTemplate(model.path)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="gptcpu", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible completions and chat on CPUs, with continuous batching.")
    app.state.scheduler, app.state.metrics, app.state.name = scheduler, metrics, name
    app.add_middleware(CountRequests, counter=metrics.requests)

    # -- errors in OpenAI's shape ----------------------------------------------------------

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, e: OpenAIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errors = e.errors() or [{"loc": (), "msg": "invalid request"}]
        loc = [p for p in errors[0].get("loc", ()) if p != "body" and not _type_tag(p)]
        param = str(loc[0]) if loc else None
        alternatives = sum(1 for x in errors if [p for p in x.get("loc", ()) if p != "body"][:1] == loc[:1])
        message = errors[0]["msg"] if alternatives == 1 else f"{errors[0]['msg']} (and {alternatives - 1} other forms fail)"
        where = ".".join(map(str, loc))
        return JSONResponse(OpenAIError(400, f"{where}: {message}" if where else message, param).body(),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return JSONResponse(OpenAIError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(GptcpuError)
    async def _engine(request, e: GptcpuError):
        return JSONResponse(OpenAIError(400, str(e)).body(), status_code=400)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise OpenAIError(401, "Incorrect or missing API key (send Authorization: Bearer KEY)",
                              code="invalid_api_key")

    def check_model(requested: str) -> None:
        if requested != name:
            raise OpenAIError(404, f"The model '{requested}' does not exist (this server has '{name}')",
                              "model", "model_not_found")

    # -- endpoints -------------------------------------------------------------------------

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "gptcpu"}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model_info(model_id: str):
        check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health():
        if scheduler.deadline is not None:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "model": name, "running": scheduler.running, "queued": scheduler.queued}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        unsupported(req)
        prompts, texts = completion_prompts(req)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        want_logprobs = req.logprobs is not None
        run = Run("cmpl", "text_completion", prompts, req, max_tokens, [], want_logprobs, req.logprobs or 0,
                  echo=bool(req.echo), prompt_texts=texts)
        return await respond(run, req, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        unsupported(req)
        text = template.render(req.messages)
        prompt = model.tokenizer.encode(text) or [model.config.bos_token_id or 0]
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if limit is None:  # chat default: as much as the context leaves
            limit = max(1, model.config.n_ctx - len(prompt))
        run = Run("chatcmpl", "chat.completion", [prompt], req, limit, template.stop, bool(req.logprobs),
                  req.top_logprobs or 0, limit_param=param)
        return await respond(run, req, request)

    # -- the work behind both --------------------------------------------------------------

    def completion_prompts(req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        elif p and all(isinstance(t, int) for t in p):
            p = [p]
        if not p:
            raise OpenAIError(400, "prompt is empty", "prompt")
        prompts, texts = [], []
        for item in p:
            ids = model.tokenizer.encode(item) if isinstance(item, str) else list(item)
            if not ids:  # an empty prompt starts from <|endoftext|>
                ids = [model.config.bos_token_id if model.config.bos_token_id is not None else 0]
            try:   # before they are decoded for echo
                check_ids(ids, model.config.n_vocab)
            except (GptcpuError, OverflowError):
                raise OpenAIError(400, f"prompt token ids must be in 0..{model.config.n_vocab - 1}", "prompt") from None
            prompts.append(ids)
            texts.append(item if isinstance(item, str) else model.tokenizer.decode(ids))
        return prompts, texts

    class Run:
        """One request's members, and how to report them."""

        def __init__(self, prefix, kind, prompts, req, max_tokens, extra_stop, logprobs, top, limit_param="max_tokens",
                     echo=False, prompt_texts=None):
            n_ctx = model.config.n_ctx
            if max_tokens < 1:
                raise OpenAIError(400, f"{limit_param} must be at least 1, got {max_tokens}", limit_param)
            for p in prompts:
                if len(p) + max_tokens > n_ctx:
                    raise OpenAIError(
                        400, f"This model's maximum context length is {n_ctx} tokens, however you requested "
                             f"{len(p) + max_tokens} tokens ({len(p)} in your prompt; {max_tokens} for the "
                             "completion). Please reduce your prompt or completion length.",
                        "messages" if kind == "chat.completion" else "prompt", "context_length_exceeded")
            self.id = f"{prefix}-{uuid.uuid4().hex}"
            self.kind, self.created, self.prompts = kind, int(time.time()), prompts
            self.chat = kind == "chat.completion"
            self.n = req.n or 1
            self.logprobs, self.echo, self.prompt_texts = logprobs, echo, prompt_texts or []
            stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
            self.stop = [s for s in stop + extra_stop if s]
            bias = None
            if req.logit_bias:
                try:
                    bias = {int(k): v for k, v in req.logit_bias.items()}
                except ValueError:
                    raise OpenAIError(400, "logit_bias keys must be token ids", "logit_bias") from None
            self.members = []
            for p in prompts:
                for j in range(self.n):
                    seed = None if req.seed is None else (req.seed + j) % 2**64
                    s = Sampling(max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                                 top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p, seed=seed,
                                 stop=self.stop, repetition_penalty=req.repetition_penalty or 1.0,
                                 logprobs=top if logprobs else None, prompt_logprobs=echo and logprobs,
                                 presence_penalty=req.presence_penalty or 0.0,
                                 frequency_penalty=req.frequency_penalty or 0.0, logit_bias=bias)
                    self.members.append(Member(model, p, s))
            self.streams = [TextStream(model.tokenizer, self.stop) for _ in self.members]
            self.texts = [""] * len(self.members)
            self.finish = [None] * len(self.members)

        def usage(self) -> dict:
            prompt = sum(len(p) for p in self.prompts)
            completion = sum(len(m.output) for m in self.members)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        def advance(self, i, token, finish) -> str:
            """A member's event -> the text it adds."""
            text = self.streams[i].push(token) if token is not None else ""
            if finish is not None:
                text += self.streams[i].finish()
                self.finish[i] = finish
            self.texts[i] += text
            return text

        # the logprobs of member i's tokens k0:k1 (and of its prompt, when echoed); start: the
        # text offset of the first (the characters of this choice already sent)
        def logprobs_of(self, i, k0, k1, with_prompt=False, start=0):
            m = self.members[i]
            items = m.logprobs[k0:k1]
            if self.chat:
                return {"content": [self._chat_lp(lp) for lp in items], "refusal": None}
            entries = []
            if with_prompt and self.echo:
                first = m.prompt[0]
                entries.append((first, None, None))
                entries += [(lp.token, lp.logprob, lp.top) for lp in m.prompt_logprobs]
            entries += [(lp.token, lp.logprob, lp.top) for lp in items]
            tokens = [token_text(t) for t, _, _ in entries]
            offsets, at = [], start
            for t in tokens:
                offsets.append(at)
                at += len(t)
            return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                    "top_logprobs": [None if top is None else {token_text(t): v for t, v in top}
                                     for _, _, top in entries],
                    "text_offset": offsets}

        @staticmethod
        def _chat_lp(lp):
            def one(t, v):
                b = model.tokenizer.token_bytes(t)
                return {"token": token_text(t), "logprob": v, "bytes": list(b)}
            return {**one(lp.token, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top]}

        def choice(self, i) -> dict:
            lp = self.logprobs_of(i, 0, len(self.members[i].logprobs), with_prompt=True) if self.logprobs else None
            if self.chat:
                return {"index": i, "message": {"role": "assistant", "content": self.texts[i], "refusal": None},
                        "logprobs": lp, "finish_reason": self.finish[i]}
            text = (self.prompt_texts[i // self.n] if self.echo else "") + self.texts[i]
            return {"text": text, "index": i, "logprobs": lp, "finish_reason": self.finish[i]}

        def chunk(self, choices, usage=None) -> str:
            body = {"id": self.id, "object": self.kind + (".chunk" if self.chat else ""), "created": self.created,
                    "model": name, "system_fingerprint": fingerprint, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        def response(self) -> dict:
            return {"id": self.id, "object": self.kind, "created": self.created, "model": name,
                    "system_fingerprint": fingerprint, "choices": [self.choice(i) for i in range(len(self.members))],
                    "usage": self.usage()}

    def token_text(t) -> str:
        b = model.tokenizer.token_bytes(t)
        try:
            return b.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)

    fingerprint = f"gptcpu-{_version()}-{model.config.dtype}"

    async def respond(run: Run, req, request: Request):
        if len(run.members) > scheduler.max_queue:
            raise OpenAIError(400, f"{len(run.members)} sequences (prompts x n) are more than this server queues "
                                   f"({scheduler.max_queue}, --max-queue)", "n")
        job = Job(run.members, asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise OpenAIError(429 if scheduler.deadline is None else 503, str(e), code="queue_full") from None
        metrics.tokens_in.inc(sum(len(p) for p in run.prompts))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(stream(run, job, include_usage), on_close=lambda: scheduler.cancel(job))
        left = len(run.members)
        while left:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    scheduler.cancel(job)
                    return Response(status_code=499)
                continue
            if event[0] == "error":
                raise OpenAIError(500, f"generation failed: {event[1]}")
            i, token, finish = event
            run.advance(i, token, finish)
            left -= finish is not None
        return run.response()

    async def stream(run: Run, job: Job, include_usage: bool):
        if run.chat:
            yield run.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(run.members))])
        sent = [None] * len(run.members)  # tokens whose logprobs were sent (None: nothing yet)
        left = len(run.members)
        while left:
            event = await job.events.get()
            if event[0] == "error":  # the stream has begun: report in-band, then end it
                yield f"data: {json.dumps(OpenAIError(500, f'generation failed: {event[1]}').body())}\n\n"
                break
            i, token, finish = event
            text = run.advance(i, token, finish)
            left -= finish is not None
            k = len(run.members[i].logprobs)
            prompt = run.prompt_texts[i // run.n] if run.echo else ""
            sent_chars = len(prompt) + len(run.texts[i]) - len(text)
            first = sent[i] is None  # echo: the prompt goes out with the member's first token
            if first:
                text = prompt + text
            lp = (run.logprobs_of(i, sent[i] or 0, k, with_prompt=first, start=0 if first else sent_chars)
                  if run.logprobs else None)
            sent[i] = k
            if not text and finish is None and not run.logprobs:
                continue
            if run.chat:
                delta = {"content": text} if text else {}
                yield run.chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}])
            else:
                yield run.chunk([{"text": text, "index": i, "logprobs": lp, "finish_reason": finish}])
        if include_usage:
            yield run.chunk([], usage=run.usage())
        yield "data: [DONE]\n\n"

    return app


class EventStream(StreamingResponse):
    """Server-sent events whose `on_close` runs however the response ends (the client gone
    included: Starlette cancels the response when it sees the disconnect)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _type_tag(part) -> bool:
    """Pydantic's name of a union member in an error's location (str, list[int], ...), not a field."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "list", "dict"} or "[" in part
                                      or part.startswith("function-"))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gptcpu")
    except PackageNotFoundError:
        return "dev"
