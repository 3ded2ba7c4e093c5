"""The HTTP side: OpenAI's completions and chat completions (plain and streamed by server-sent events),
models, health, Prometheus metrics, and vLLM's tokenizer endpoints (lm-eval's `local-completions` scores
prompts through them). Requests become `Request`s for the engine thread; its events come back through an
asyncio queue per HTTP call."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from rdlm.inference.checks import GenerateError
from rdlm.inference.criteria import CRITERIA
from rdlm.serve.engine import Draining, Engine, Event, Options, QueueFull, Request, check_fits, step
from rdlm.serve.protocol import ApiError, ChatRequest, Common, CompletionRequest, field_path, finite
from rdlm.tokenizer import Tokenizer

RETRY_AFTER_S = 1  # the hint a 429 carries


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The server's per-request defaults (its flags)."""
    num_steps: int = 32
    exit_criterion: str = "none"
    exit_threshold: float | None = None
    continuous: bool = False
    init_scale: float = 1.0
    timeout: float = 600.0  # seconds a request may take, queued and running


class Metrics:
    """A Prometheus registry: the engine's counters read at scrape time, latency histograms observed here."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.latency = Histogram("rdlm_request_latency_seconds", "Arrival to last token", registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.first_token = Histogram("rdlm_time_to_first_token_seconds", "Arrival to first token",
                                     registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.rejected = 0

    def collect(self):
        e, s = self.engine, self.engine.stats
        requests = CounterMetricFamily("rdlm_requests", "Requests ended, by outcome", labels=["outcome"])
        for outcome, n in sorted((s.finished | {"rejected": self.rejected}).items()):
            requests.add_metric([outcome], n)
        yield requests
        tokens_per_s, mean_steps = s.window()
        yield from (
            GaugeMetricFamily("rdlm_queue_depth", "Requests waiting for a slot", value=e.queue_depth),
            GaugeMetricFamily("rdlm_slots_busy", "Slots holding a request", value=e.busy),
            GaugeMetricFamily("rdlm_slots", "Slots in the engine", value=e.plan.slots),
            CounterMetricFamily("rdlm_prompt_tokens", "Prompt tokens prefilled", value=s.prompt_tokens),
            CounterMetricFamily("rdlm_generated_tokens", "Tokens generated", value=s.generated_tokens),
            CounterMetricFamily("rdlm_recurrence_steps", "Recurrences run for generated tokens",
                                value=s.recurrence_steps),
            CounterMetricFamily("rdlm_engine_steps", "Engine steps run", value=s.steps_run),
            GaugeMetricFamily("rdlm_step_compiles_since_warmup", "Step programs compiled after warm-up (0 expected)",
                              value=step._cache_size() - e.compiles),
            GaugeMetricFamily("rdlm_tokens_per_second", "Generated tokens per second over the last 10 s",
                              value=tokens_per_s),
            GaugeMetricFamily("rdlm_mean_recurrence_steps", "Recurrences per generated token over the last 10 s",
                              value=mean_steps),
            GaugeMetricFamily("rdlm_cache_positions_used", "KV cache positions holding live tokens",
                              value=e.cache_positions()),
            GaugeMetricFamily("rdlm_cache_use_ratio", "Live positions over all slots' positions",
                              value=e.cache_positions() / (e.plan.slots * e.plan.context)),
        )


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


@dataclasses.dataclass
class Answer:
    """One choice being collected."""
    index: int
    prompt_ids: list[int]
    prompt_text: str
    text: str = ""
    events: list[Event] = dataclasses.field(default_factory=list)
    finish: str | None = None
    error: str | None = None

    def tokens(self, prompt: bool) -> list[int]:
        return [t for e in self.events if e.prompt == prompt for t in e.tokens]

    def steps(self) -> list[int]:
        return [s for e in self.events if not e.prompt for s in e.steps]


class Server:
    """The routes over one engine."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer | None, name: str, defaults: Defaults):
        self.engine, self.tok, self.name, self.defaults = engine, tokenizer, name, defaults
        self.metrics = Metrics(engine)
        self.created = int(time.time())

    # -- checks

    def _options(self, body: Common, max_tokens: int | None, prompt_len: int, logprobs: int, echo: bool) -> Options:
        """The request's settings, each checked against the model and the server's flags (400 naming the field)."""
        cfg, plan, d = self.engine.cfg, self.engine.plan, self.defaults
        if body.model not in (None, self.name):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {self.name!r}",
                           "model", code="model_not_found")
        num_steps = d.num_steps if body.num_steps is None else body.num_steps
        if num_steps > plan.max_steps:
            raise ApiError(400, f"num_steps={num_steps} is out of range; valid range is [1, {plan.max_steps}] "
                                "(the server's --max-steps)", "num_steps")
        criterion = body.exit_criterion or (d.exit_criterion if body.exit_threshold is None or body.exit_criterion
                                            else None)
        if criterion not in CRITERIA:
            raise ApiError(400, f"unknown exit_criterion={body.exit_criterion!r}; valid: {', '.join(CRITERIA)}"
                           if criterion else "exit_threshold was given without an exit_criterion", "exit_criterion")
        crit = CRITERIA[criterion]
        threshold = body.exit_threshold if body.exit_threshold is not None else (
            d.exit_threshold if d.exit_threshold is not None and criterion == d.exit_criterion else crit.default)
        if body.exit_threshold is not None:
            low, high = crit.valid
            if criterion == "none" or not low < threshold <= high or (crit.counting and not threshold.is_integer()):
                raise ApiError(400, f"exit_threshold={threshold} is out of range for {criterion}; valid range is "
                                    f"({low}, {high}]" + (" (an integer)" if crit.counting else ""), "exit_threshold")
        if body.cache_strategy not in (None, plan.strategy):
            raise ApiError(400, f"cache_strategy={body.cache_strategy!r}: this server's cache is laid out for "
                                f"{plan.strategy!r} (start it with --cache-strategy to serve another)", "cache_strategy")
        if body.top_k > cfg.vocab_size:
            raise ApiError(400, f"top_k={body.top_k} is out of range; valid range is [0, {cfg.vocab_size}]", "top_k")
        if max_tokens is None:
            max_tokens = plan.context - prompt_len
        try:
            check_fits(prompt_len, max_tokens, plan)
        except GenerateError as e:
            raise ApiError(400, str(e), "max_tokens" if prompt_len < plan.context else "prompt") from None
        if body.timeout is not None and body.timeout > d.timeout:
            raise ApiError(400, f"timeout={body.timeout} is out of range; valid range is (0, {d.timeout}] (the "
                                "server's --request-timeout)", "timeout")
        seed = body.seed if body.seed is not None else (0 if body.temperature == 0 else secrets.randbits(31))
        return Options(max_tokens=max_tokens, num_steps=num_steps, exit_criterion=criterion,
                       exit_threshold=float(threshold if criterion != "none" else 0.0),
                       continuous=d.continuous if body.continuous is None else body.continuous,
                       init_scale=d.init_scale if body.init_scale is None else body.init_scale,
                       temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                       seed=seed, stop=tuple(body.stop or ()), logprobs=logprobs, echo=echo,
                       timeout=body.timeout or d.timeout)

    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self.tok is None:
            raise ApiError(400, f"this server has no tokenizer, so {what}; send token ids as the prompt "
                                "(or start the server with --tokenizer)", "prompt" if "prompt" in what else "messages")
        return self.tok

    def _ids(self, prompt: str | list[int], i: int) -> tuple[list[int], str]:
        if isinstance(prompt, str):
            return self._need_tokenizer("a text prompt cannot be read").encode(prompt).tolist(), prompt
        bad = [t for t in prompt if not 0 <= t < self.engine.cfg.vocab_size]
        if bad:
            raise ApiError(400, f"prompt {i} has token ids outside [0, vocab_size={self.engine.cfg.vocab_size}): "
                                f"{bad[:5]}", "prompt")
        return list(prompt), self.tok.decode(prompt) if self.tok is not None else ""

    # -- running requests

    async def _run(self, http: HttpRequest, answers: list[Answer], options: list[Options]) -> AsyncIterator[
            tuple[Answer, Event]]:
        """Submit one engine request per answer and yield their events as they come; cancel what is left if
        the consumer stops (the client went away) or the server is shutting down."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        deadline = time.monotonic() + min(o.timeout for o in options)

        def emitter(i: int):
            def emit(event: Event) -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                    loop.call_soon_threadsafe(events.put_nowait, (i, event))
            return emit

        requests = [Request(a.prompt_ids, o, emitter(i), deadline) for i, (a, o) in enumerate(zip(answers, options))]
        submitted = []
        try:
            for r in requests:
                self.engine.submit(r)
                submitted.append(r)
        except QueueFull as e:
            for r in submitted:
                self.engine.cancel(r)
            self.metrics.rejected += 1
            raise ApiError(429, f"the server is at capacity: {e}; retry after {RETRY_AFTER_S} s", None,
                           "rate_limit_error", "queue_full", {"Retry-After": str(RETRY_AFTER_S)}) from None
        except Draining as e:
            self.metrics.rejected += 1
            raise ApiError(503, str(e), None, "server_error", "shutting_down") from None
        open_ = len(requests)
        try:
            while open_:
                i, event = await events.get()
                a = answers[i]
                r = requests[i]
                if r.first_token_at is not None and not a.events and not event.prompt:
                    self.metrics.first_token.observe(r.first_token_at - r.arrived)
                a.events.append(event)
                a.text += event.text
                if event.finish:
                    a.finish, a.error = event.finish, event.error
                    open_ -= 1
                    self.metrics.latency.observe(time.monotonic() - r.arrived)
                yield a, event
        finally:
            for r, a in zip(requests, answers):
                if a.finish is None:
                    self.engine.cancel(r)

    async def _collect(self, http: HttpRequest, answers: list[Answer], options: list[Options]) -> None:
        """Run to the end, checking that the client is still there (a gone client frees its slots)."""
        stream = self._run(http, answers, options)
        try:
            while True:
                nxt = asyncio.ensure_future(anext(stream))
                while not nxt.done():
                    await asyncio.wait({nxt}, timeout=0.1)
                    if not nxt.done() and await http.is_disconnected():
                        nxt.cancel()
                        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                            await nxt
                        return
                try:
                    nxt.result()
                except StopAsyncIteration:
                    return
        finally:
            await stream.aclose()

    @staticmethod
    def _failure(a: Answer) -> ApiError | None:
        if a.finish == "timeout":
            return ApiError(504, "the request ran past its timeout (the body's `timeout`, at most the server's "
                                 "--request-timeout)", None, "timeout_error", "timeout")
        if a.finish == "shutdown":
            return ApiError(503, "the server shut down before the request finished", None, "server_error",
                            "shutting_down")
        if a.finish == "error":
            return ApiError(500, f"the engine failed: {a.error}", None, "server_error", "engine_error")
        return None

    def _usage(self, answers: list[Answer]) -> dict[str, Any]:
        prompt = sum(len(a.prompt_ids) for a in answers)
        done = sum(len(a.tokens(False)) for a in answers)
        steps = [s for a in answers for s in a.steps()]
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                "mean_recurrence_steps": sum(steps) / len(steps) if steps else 0.0}

    def _piece(self, token: int) -> str:
        return self.tok.decode([token]) if self.tok is not None else f"<{token}>"

    def _completion_logprobs(self, a: Answer, start: int = 0) -> dict[str, Any]:
        tokens, lps, tops = [], [], []
        for e in a.events:
            tokens += e.tokens
            lps += e.logprobs
            tops += e.top
        pieces = [self._piece(t) for t in tokens]
        offsets, at = [], start
        for p in pieces:
            offsets.append(at)
            at += len(p)
        return {"tokens": pieces, "token_logprobs": [finite(x) for x in lps],
                "top_logprobs": [None if t is None else {self._piece(i): finite(v) for i, v in t} for t in tops],
                "text_offset": offsets}

    # -- routes

    async def completions(self, body: CompletionRequest, http: HttpRequest) -> Response:
        raw = body.prompt
        prompts = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
        answers, options = [], []
        for i, p in enumerate(prompts):
            ids, text = self._ids(p, i)
            answers.append(Answer(i, ids, text))
            options.append(self._options(body, body.max_tokens, len(ids), body.logprobs or 0, body.echo))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        if body.stream:
            async def chunks() -> AsyncIterator[str]:
                async for a, e in self._run(http, answers, options):
                    if e.prompt and not body.echo:
                        continue
                    text = (a.prompt_text if e.prompt and e is a.events[0] else "") + (e.text if not e.prompt else "")
                    if e.finish and (failure := self._failure(a)):
                        yield _sse(failure.body())
                        continue
                    choice = {"index": a.index, "text": text, "finish_reason": e.finish,
                              "logprobs": self._event_logprobs(e) if body.logprobs is not None else None,
                              "token_ids": e.tokens, "recurrence_steps": e.steps if not e.prompt else []}
                    yield _sse(head | {"choices": [choice]})
                if body.include_usage:
                    yield _sse(head | {"choices": [], "usage": self._usage(answers)})
                yield "data: [DONE]\n\n"
            return self._streaming(chunks())
        await self._collect(http, answers, options)
        for a in answers:
            if failure := self._failure(a):
                raise failure
        choices = []
        for a in answers:
            prefix = a.prompt_text if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._completion_logprobs(a)
            choices.append({"index": a.index, "text": prefix + a.text, "finish_reason": a.finish,
                            "logprobs": logprobs, "token_ids": a.tokens(False), "recurrence_steps": a.steps()})
        return JSONResponse(head | {"choices": choices, "usage": self._usage(answers)})

    def _event_logprobs(self, e: Event) -> dict[str, Any]:
        return self._completion_logprobs(Answer(0, [], "", events=[e]))

    def _chat_logprobs(self, e: Event) -> list[dict[str, Any]]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            piece = self._piece(t)
            return {"token": piece, "logprob": finite(lp), "bytes": list(piece.encode())}
        return [entry(t, lp) | {"top_logprobs": [entry(i, v) for i, v in top]}
                for t, lp, top in zip(e.tokens, e.logprobs, e.top)]

    async def chat(self, body: ChatRequest, http: HttpRequest) -> Response:
        tok = self._need_tokenizer("chat messages cannot be formatted")
        if tok.chat_template is None:
            raise ApiError(400, f"the tokenizer {tok.source} has no chat template; use /v1/completions", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            ids = tok.encode_chat(messages).tolist()
        except Exception as e:  # noqa: BLE001 - a template may raise anything; the client sent what it rendered
            raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from None
        answers = [Answer(0, ids, "")]
        options = [self._options(body, body.max_completion_tokens or body.max_tokens, len(ids),
                                 (body.top_logprobs or 0) if body.logprobs else 0, False)]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.name}
        if body.stream:
            async def chunks() -> AsyncIterator[str]:
                head_c = head | {"object": "chat.completion.chunk"}
                yield _sse(head_c | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
                async for a, e in self._run(http, answers, options):
                    if e.finish and (failure := self._failure(a)):
                        yield _sse(failure.body())
                        continue
                    choice = {"index": 0, "delta": {"content": e.text} if e.text or not e.finish else {},
                              "logprobs": {"content": self._chat_logprobs(e)} if body.logprobs else None,
                              "finish_reason": e.finish, "token_ids": e.tokens, "recurrence_steps": e.steps}
                    yield _sse(head_c | {"choices": [choice]})
                if body.include_usage:
                    yield _sse(head_c | {"choices": [], "usage": self._usage(answers)})
                yield "data: [DONE]\n\n"
            return self._streaming(chunks())
        await self._collect(http, answers, options)
        a = answers[0]
        if failure := self._failure(a):
            raise failure
        logprobs = None
        if body.logprobs:
            logprobs = {"content": [x for e in a.events for x in self._chat_logprobs(e)]}
        choice = {"index": 0, "message": {"role": "assistant", "content": a.text}, "logprobs": logprobs,
                  "finish_reason": a.finish, "token_ids": a.tokens(False), "recurrence_steps": a.steps()}
        return JSONResponse(head | {"object": "chat.completion", "choices": [choice], "usage": self._usage(answers)})

    @staticmethod
    def _streaming(chunks: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class TokenizeRequest(BaseModel):
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    tokens: list[int]


def create_app(engine: Engine, tokenizer: Tokenizer | None, name: str, defaults: Defaults = Defaults()) -> FastAPI:
    """The ASGI app; its lifespan compiles the engine's step, starts the engine thread and stops it at shutdown."""
    server = Server(engine, tokenizer, name, defaults)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(engine.warm_up)
        engine.start()
        try:
            yield
        finally:
            engine.drain()
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="rdlm", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HttpRequest, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        param = field_path(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {message}", None
        elif first.get("type") == "extra_forbidden":
            message = f"unknown field {param!r}"
        else:
            message = f"{param}: {message}" if param else message
        return _error_response(ApiError(400, message, param or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, e: HTTPException) -> JSONResponse:
        return _error_response(ApiError(e.status_code, str(e.detail), None,
                                        "not_found_error" if e.status_code == 404 else "invalid_request_error"))

    @app.exception_handler(Exception)
    async def crashed(request: HttpRequest, e: Exception) -> JSONResponse:  # a bug: answered, logged, not fatal
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "server_error"))

    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": server.created,
                                            "owned_by": "rdlm", "max_model_len": engine.plan.context}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "error": engine.error}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        tok = server._need_tokenizer("text cannot be tokenized")
        ids = tok.encode(body.prompt, bos=body.add_special_tokens).tolist()
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.plan.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        tok = server._need_tokenizer("tokens cannot be read")
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tok = server._need_tokenizer("it has no tokenizer info")
        special = {k: tok.decode([i]) for k, i in (("bos_token", tok.bos), ("eos_token", tok.eos),
                                                   ("pad_token", tok.pad)) if i is not None}
        return special | {"chat_template": tok.chat_template, "model_max_length": engine.plan.context}

    return app
