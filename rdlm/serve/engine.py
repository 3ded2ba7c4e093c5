"""Continuous batching: a fixed number of slots share one static KV cache; a thread keeps them full.

Every engine step is one compiled program (`step`): one chunk of one prompt is prefilled and every
decoding slot advances by one token, so running requests keep streaming while a long prompt is read.
What differs between requests is traced, per slot (`SlotSettings`): position, recurrence cap, exit
criterion and threshold, sampling settings, continuous decoding, random key. The program is compiled
once at start-up and reused for every request. A finished slot is refilled from the queue at once.

Prompts run every recurrence up to the request's `num_steps` (exit criteria act on generated tokens):
an exit decided over a chunk would make the answer depend on where chunks split the prompt. Each
request's draws are keyed by its seed and token position (`rdlm.inference.engine.position_keys`), as
`rdlm.generate` draws them for a batch of one: greedy output equals `rdlm.generate(...,
exit_in_prefill=False)` token for token (the two are the same without an exit criterion), and sampled
output equals it for the same seed. Stop ids, stop strings, lengths, deadlines and
cancellation are checked on the host after each step; a slot that ends is free for the next step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rdlm.config import ModelConfig
from rdlm.inference.cache import CACHE_AXES, KVCache, cache_slots, init_cache
from rdlm.inference.checks import GenerateError
from rdlm.inference.criteria import CRITERIA
from rdlm.inference.engine import Knobs, NewTokens, Pass, forward_tokens, row_keys, sample_at
from rdlm.inference.sampling import Sampling
from rdlm.serve.text import TextStream
from rdlm.tokenizer import Tokenizer

Params = dict[str, Any]
CRITERIA_NAMES = tuple(CRITERIA)  # a slot's `criterion` indexes this
TOP_LOGPROBS = 20  # alternatives kept per token (OpenAI's chat maximum)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What shapes the step program (static): one compile per server."""
    slots: int
    context: int  # cache positions per slot (prompt + generated tokens)
    chunk: int  # prompt tokens prefilled per step
    max_steps: int  # the largest recurrence cap a request may ask for
    strategy: str  # cache lookup strategy (it decides the core cache's layout)


@struct.dataclass
class SlotState:
    """What stays on the device between steps."""
    cache: KVCache  # one row per slot
    token: jax.Array  # [S] each slot's last token: its next decode input
    latent: jax.Array  # [S, 1, e] that token's final latent (continuous decoding)


@struct.dataclass
class SlotSettings:
    """Per-slot values of one step, made on the host."""
    keys: jax.Array  # [S, ...] key data of each request's seed
    cap: jax.Array  # [S] recurrence cap
    knobs: Knobs  # per-slot init scale, threshold, sampling, criterion index
    continuous: jax.Array  # [S] warm-start each token from the previous one's latent
    decoding: jax.Array  # [S] slots that decode a token this step
    reset: jax.Array  # [S] slots whose cache restarts (a new request); applied before anything else


@struct.dataclass
class Chunk:
    """The prompt tokens of one slot prefilled this step."""
    slot: jax.Array  # scalar
    ids: jax.Array  # [C]
    next_ids: jax.Array  # [C] the token after each (scored for echo logprobs)
    length: jax.Array  # real tokens in ids (0: no prefill this step)
    final: jax.Array  # the prompt ends here: sample the slot's first token


@struct.dataclass
class StepOutput:
    """Per slot: the token made this step (-1: none), its logprob, the top alternatives, recurrences run;
    for the chunk: each prompt token's logprob given the ones before, and its top alternatives."""
    token: jax.Array  # [S]
    logprob: jax.Array  # [S]
    top_ids: jax.Array  # [S, K]
    top_logprobs: jax.Array  # [S, K]
    steps: jax.Array  # [S]
    chunk_logprob: jax.Array  # [C] of next_ids
    chunk_top_ids: jax.Array  # [C, K]
    chunk_top_logprobs: jax.Array  # [C, K]
    chunk_steps: jax.Array  # recurrences the chunk ran


def _batch_axis(axes: tuple[str | None, ...]) -> int:
    return axes.index("batch")


def _take_row(cache: KVCache, i: jax.Array) -> KVCache:
    return jax.tree.map(lambda x, axes: jax.lax.dynamic_slice_in_dim(x, i, 1, _batch_axis(axes)), cache, CACHE_AXES,
                        is_leaf=lambda x: isinstance(x, tuple))


def _put_row(cache: KVCache, row: KVCache, i: jax.Array) -> KVCache:
    return jax.tree.map(lambda x, r, axes: jax.lax.dynamic_update_slice_in_dim(x, r, i, _batch_axis(axes)),
                        cache, row, CACHE_AXES, is_leaf=lambda x: isinstance(x, tuple))


def _scored(logits: jax.Array, chosen: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logprob of `chosen`, top-K ids, their logprobs) from fp32 logits [n, v]."""
    logp = jax.nn.log_softmax(logits, -1)
    top, ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    return jnp.take_along_axis(logp, jnp.maximum(chosen, 0)[:, None], -1)[:, 0], ids.astype(jnp.int32), top


def _sample(logits: jax.Array, keys: jax.Array, positions: jax.Array, sampling: Sampling) -> jax.Array:
    """Tokens [n]: argmax, unless a row samples (the sort over the vocabulary only runs then)."""
    return jax.lax.cond(jnp.any(sampling.temperature > 0),
                        lambda: sample_at(logits, keys, positions, sampling, True),
                        lambda: sample_at(logits, keys, positions, sampling, False))


@functools.partial(jax.jit, static_argnames=("cfg", "plan"), donate_argnums=(1,))
def step(params: Params, state: SlotState, settings: SlotSettings, chunk: Chunk, cfg: ModelConfig,
         plan: Plan) -> tuple[SlotState, StepOutput]:
    """One engine step: prefill `chunk` into its slot (when it has tokens), then decode one token for every
    decoding slot (when there is one). A slot whose prompt ends in this chunk gets its first token here."""
    S, C, K = plan.slots, plan.chunk, TOP_LOGPROBS
    keys = jax.random.wrap_key_data(settings.keys)
    cache = state.cache.replace(length=jnp.where(settings.reset, 0, state.cache.length))
    knobs = settings.knobs

    def prefill(cache: KVCache):
        p = chunk.slot
        row = _take_row(cache, p)
        new = NewTokens(chunk.ids[None], (chunk.length - 1)[None], jnp.ones((1,), bool), keys[p][None],
                        cap=settings.cap[p][None])
        out = forward_tokens(params, row, new, knobs.row(p).replace(criterion=None), cfg,  # no exit: see the top
                             Pass(plan.max_steps, ("none",), plan.strategy, True, True))
        logits = out.logits[0]  # [C, v]
        lp, top_ids, top = _scored(logits, chunk.next_ids)
        position = row.length + chunk.length  # where the first generated token goes
        last = logits[chunk.length - 1][None]
        token = _sample(last, keys[p][None], position, jax.tree.map(lambda x: x[p][None], knobs.sampling))
        first = (token[0],) + tuple(x[0] for x in _scored(last, token)) + (out.steps[0],)
        cache = _put_row(cache, out.cache.replace(length=position), p)
        return cache, (lp, top_ids, top, out.steps[0]), first, out.latents[0, chunk.length - 1]

    def no_prefill(cache: KVCache):
        e = cfg.n_embd
        return (cache, (jnp.zeros((C,)), jnp.zeros((C, K), jnp.int32), jnp.zeros((C, K)), jnp.int32(0)),
                (jnp.int32(-1), jnp.float32(0), jnp.zeros((K,), jnp.int32), jnp.zeros((K,)), jnp.int32(0)),
                jnp.zeros((e,), cfg.dtype))

    cache, (chunk_lp, chunk_ids, chunk_top, chunk_steps), first, first_latent = jax.lax.cond(
        chunk.length > 0, prefill, no_prefill, cache)

    def decode(cache: KVCache):
        new = NewTokens(state.token[:, None], jnp.zeros((S,), jnp.int32), settings.decoding, keys,
                        warm=state.latent, warm_rows=settings.continuous, cap=settings.cap)
        out = forward_tokens(params, cache, new, knobs, cfg, Pass(plan.max_steps, CRITERIA_NAMES, plan.strategy,
                                                                  True, False))
        logits = out.logits[:, 0]
        token = _sample(logits, keys, cache.length + 1, knobs.sampling)
        lp, top_ids, top = _scored(logits, token)
        cache = out.cache.replace(length=cache.length + settings.decoding)
        return cache, (token, lp, top_ids, top, out.steps), out.latents

    def no_decode(cache: KVCache):
        return cache, (state.token, jnp.zeros((S,)), jnp.zeros((S, K), jnp.int32), jnp.zeros((S, K)),
                       jnp.zeros((S,), jnp.int32)), state.latent

    cache, made, latent = jax.lax.cond(jnp.any(settings.decoding), decode, no_decode, cache)
    made = tuple(jnp.where(settings.decoding.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))
                 for x in made)
    token = jnp.where(settings.decoding, made[0], -1)
    starts = (chunk.length > 0) & chunk.final
    token, lp, top_ids, top, steps = (
        jnp.where(starts, x.at[chunk.slot].set(f), x) for x, f in zip((token, *made[1:]), first))
    state = SlotState(cache=cache, token=jnp.where(settings.decoding, made[0], state.token),
                      latent=jnp.where(settings.decoding[:, None, None], latent, state.latent))
    state = state.replace(token=jnp.where(starts, state.token.at[chunk.slot].set(first[0]), state.token),
                          latent=jnp.where(starts, state.latent.at[chunk.slot, 0].set(first_latent), state.latent))
    return state, StepOutput(token, lp, top_ids, top, steps, chunk_lp, chunk_ids, chunk_top, chunk_steps)


# ---- the host side -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    """A request's generation settings (checked by the server before it is queued)."""
    max_tokens: int = 16
    num_steps: int = 32
    exit_criterion: str = "none"
    exit_threshold: float = 0.0
    continuous: bool = False
    init_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int = 0  # alternatives to report per token (0: none; the chosen token's logprob is always kept)
    echo: bool = False  # also score the prompt's tokens
    timeout: float = math.inf  # seconds from arrival (the server sets each request's deadline from it)


@dataclasses.dataclass
class Event:
    """What the engine tells a request's consumer: new tokens (with their text delta), or the end."""
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    steps: list[int] = dataclasses.field(default_factory=list)
    prompt: bool = False  # these are echoed prompt tokens (logprob None for the first)
    finish: str | None = None  # "stop", "length", "cancelled", "timeout", "shutdown", "error"
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt in flight; `emit` is called from the engine thread with each `Event`."""
    prompt: list[int]
    options: Options
    emit: Callable[[Event], None]
    deadline: float = math.inf
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    # engine bookkeeping
    key: np.ndarray | None = None
    prefilled: int = 0
    generated: int = 0
    text: TextStream | None = None
    first_token_at: float | None = None
    scored: tuple[float, list[tuple[int, float]]] | None = None  # echo: the next prompt token's, from the last chunk


class QueueFull(Exception):
    """The waiting queue is at its bound."""


class Draining(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclasses.dataclass
class Stats:
    """Counters the metrics endpoint reads (written by the engine thread only)."""
    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    recurrence_steps: int = 0
    steps_run: int = 0
    recent: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=256))
    # (time, tokens, recurrence steps) of recent engine steps: tokens/s and mean steps per token

    def window(self, seconds: float = 10.0) -> tuple[float, float]:
        """(decode tokens/s, mean recurrence steps per token) over the last `seconds`."""
        now = time.monotonic()
        recent = [r for r in list(self.recent) if now - r[0] <= seconds]
        tokens = sum(r[1] for r in recent)
        span = now - recent[0][0] if len(recent) > 1 else seconds
        return tokens / max(span, 1e-9), (sum(r[2] for r in recent) / tokens if tokens else 0.0)


class Engine:
    """The slots, the waiting queue and the thread that runs `step` while there is work."""

    def __init__(self, params: Params, cfg: ModelConfig, tokenizer: Tokenizer | None, plan: Plan, *,
                 max_queue: int = 64):
        self.params, self.cfg, self.tok, self.plan = params, cfg, tokenizer, plan
        self.max_queue = max_queue
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * plan.slots
        self.stats = Stats()
        self._wake = threading.Condition()
        self._draining = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._reset: set[int] = set()  # slots admitted since the last step
        self.state = SlotState(cache=init_cache(cfg, plan.slots, plan.context,
                                                cache_slots(plan.strategy, plan.max_steps, cfg)),
                               token=jnp.zeros((plan.slots,), jnp.int32),
                               latent=jnp.zeros((plan.slots, 1, cfg.n_embd), cfg.dtype))
        self._key_shape = jax.random.key_data(jax.random.key(0)).shape
        self.error: str | None = None
        self.compiles = 0  # programs `step` holds after warm-up (the metrics report any compiled since)

    # -- the consumer's side (any thread)

    def submit(self, request: Request) -> None:
        """Queue a request, or raise `QueueFull` / `Draining`."""
        with self._wake:
            if self._draining or self._stopped:
                raise Draining("the server is shutting down")
            if len(self.waiting) >= self.max_queue + self.plan.slots - self.busy:  # free slots admit at the next step
                raise QueueFull(f"{self.plan.slots} slots are busy and {self.max_queue} requests wait (--max-queue)")
            request.key = _key_data(request.options.seed)
            self.waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """End a request early (its client went away); its slot is freed at the next step."""
        request.cancelled.set()
        with self._wake:
            self._wake.notify()

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def cache_positions(self) -> int:
        """Cache positions holding live entries (prompt and generated tokens of the requests in slots)."""
        return sum(r.prefilled + r.generated for r in self.slots if r is not None)

    # -- lifecycle

    def warm_up(self) -> None:
        """Compile the step program (the only one) before the first request."""
        for _ in range(2):  # the second call sees the first's outputs as inputs (committed arrays): its own entry
            self.state, out = step(self.params, self.state, self._settings([False] * self.plan.slots),
                                   self._chunk(None), cfg=self.cfg, plan=self.plan)
        jax.block_until_ready(out)
        _key_data(0)
        self.compiles = step._cache_size()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rdlm-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Take no new requests; those queued or in slots still finish."""
        with self._wake:
            self._draining = True

    def stop(self, timeout: float = 30.0) -> None:
        """End every request still queued or running (finish reason "shutdown") and join the thread."""
        with self._wake:
            self._draining = self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # -- the engine thread

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopped and not self.waiting and self.busy == 0:
                        self._wake.wait()
                    if self._stopped:
                        break
                self._expire()
                self._admit()
                if self.busy:
                    self._step()
        except Exception as e:  # noqa: BLE001 - a failed step ends every request with the reason, not a hang
            self.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            for i, r in enumerate(self.slots):
                if r is not None:
                    self._finish(i, "error" if self.error else "shutdown", self.error)
            with self._wake:
                waiting, self.waiting = list(self.waiting), collections.deque()
            for r in waiting:
                r.emit(Event(finish="error" if self.error else "shutdown", error=self.error))

    def _expire(self) -> None:
        """End cancelled and timed-out requests, queued or in a slot."""
        now = time.monotonic()
        with self._wake:
            gone = [r for r in self.waiting if r.cancelled.is_set() or now > r.deadline]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self._count("cancelled" if r.cancelled.is_set() else "timeout")
            r.emit(Event(finish="cancelled" if r.cancelled.is_set() else "timeout"))
        for i, r in enumerate(self.slots):
            if r is not None and (r.cancelled.is_set() or now > r.deadline):
                self._finish(i, "cancelled" if r.cancelled.is_set() else "timeout")

    def _admit(self) -> None:
        with self._wake:
            for i in range(self.plan.slots):
                if self.slots[i] is None and self.waiting:
                    r = self.waiting.popleft()
                    r.prefilled = r.generated = 0
                    r.text = TextStream(self.tok, r.prompt, r.options.stop) if self.tok is not None else None
                    self.slots[i] = r
                    self._reset.add(i)

    def _settings(self, decoding: list[bool]) -> SlotSettings:
        S = self.plan.slots
        rows = [r or Request([], Options(), lambda e: None) for r in self.slots]
        o = [r.options for r in rows]
        keys = np.stack([r.key if r.key is not None else np.zeros(self._key_shape, np.uint32) for r in rows])
        reset = np.zeros((S,), bool)
        reset[list(self._reset)] = True
        self._reset = set()

        def col(f, dtype):
            return np.asarray([f(x) for x in o], dtype)

        knobs = Knobs(col(lambda x: x.init_scale, np.float32), col(lambda x: x.exit_threshold, np.float32),
                      np.float32(1.0),
                      Sampling(col(lambda x: x.temperature, np.float32), col(lambda x: x.top_k, np.int32),
                               col(lambda x: x.top_p, np.float32), col(lambda x: x.min_p, np.float32)),
                      col(lambda x: CRITERIA_NAMES.index(x.exit_criterion), np.int32))
        return SlotSettings(keys=keys, cap=col(lambda x: x.num_steps, np.int32), knobs=knobs,
                            continuous=col(lambda x: x.continuous, bool), decoding=np.asarray(decoding, bool),
                            reset=reset)

    def _chunk(self, slot: int | None) -> Chunk:
        C = self.plan.chunk
        ids, next_ids = np.zeros((C,), np.int32), np.full((C,), -1, np.int32)
        if slot is None:
            return Chunk(np.int32(0), ids, next_ids, np.int32(0), np.bool_(False))
        r = self.slots[slot]
        part = r.prompt[r.prefilled:r.prefilled + C]
        ids[:len(part)] = part
        after = r.prompt[r.prefilled + 1:r.prefilled + C + 1]
        next_ids[:len(after)] = after
        return Chunk(np.int32(slot), ids, next_ids, np.int32(len(part)),
                     np.bool_(r.prefilled + len(part) == len(r.prompt)))

    def _step(self) -> None:
        prefilling = [i for i, r in enumerate(self.slots) if r is not None and r.prefilled < len(r.prompt)]
        p = min(prefilling, key=lambda i: self.slots[i].arrived) if prefilling else None  # oldest first
        decoding = [r is not None and r.prefilled == len(r.prompt) for r in self.slots]
        chunk = self._chunk(p)
        settings = self._settings(decoding)
        self.state, out = step(self.params, self.state, settings, chunk, cfg=self.cfg, plan=self.plan)
        out = jax.device_get(out)
        now = time.monotonic()
        made = steps = 0
        if p is not None:
            r = self.slots[p]
            n = int(chunk.length)
            if r.options.echo:
                self._echo(r, chunk, out, n)
            r.prefilled += n
            self.stats.prompt_tokens += n
        for i, r in enumerate(self.slots):
            if r is None or out.token[i] < 0:
                continue
            made += 1
            steps += int(out.steps[i])
            self._token(i, r, out, now)
        self.stats.steps_run += 1
        self.stats.generated_tokens += made
        self.stats.recurrence_steps += steps
        self.stats.recent.append((now, made, steps))

    def _echo(self, r: Request, chunk: Chunk, out: StepOutput, n: int) -> None:
        """The chunk's prompt tokens with the logprob of each given the ones before (None for the first)."""
        ids = [int(t) for t in chunk.ids[:n]]
        scored = [(float(out.chunk_logprob[j]), self._top(out.chunk_top_ids[j], out.chunk_top_logprobs[j], r))
                  for j in range(n)]
        first = r.scored or (None, None)
        r.scored = scored[-1]
        lps, tops = [first[0]] + [x[0] for x in scored[:-1]], [first[1]] + [x[1] for x in scored[:-1]]
        r.emit(Event(tokens=ids, logprobs=lps, top=tops, steps=[int(out.chunk_steps)] * n, prompt=True))

    @staticmethod
    def _top(ids: np.ndarray, lps: np.ndarray, r: Request) -> list[tuple[int, float]]:
        return [(int(a), float(b)) for a, b in zip(ids[:r.options.logprobs], lps[:r.options.logprobs])]

    def _token(self, i: int, r: Request, out: StepOutput, now: float) -> None:
        """A slot's new token: stream it, then end the request on a stop id, a stop string or its length."""
        token = int(out.token[i])
        if r.first_token_at is None:
            r.first_token_at = now
        if r.options.max_tokens == 0:  # scoring only (echo): the token is not part of the answer
            self._finish(i, "length")
            return
        r.generated += 1
        stop_id = self.tok is not None and token in self.tok.stop_ids
        delta, stopped = ("", False) if r.text is None or stop_id else r.text.push(token)
        r.emit(Event(text=delta, tokens=[token], logprobs=[float(out.logprob[i])],
                     top=[self._top(out.top_ids[i], out.top_logprobs[i], r)], steps=[int(out.steps[i])]))
        full = r.prefilled + r.generated >= self.plan.context
        if stop_id or stopped:
            self._finish(i, "stop")
        elif r.generated >= r.options.max_tokens or full:
            self._finish(i, "length")

    def _finish(self, i: int, reason: str, error: str | None = None) -> None:
        r, self.slots[i] = self.slots[i], None
        tail = r.text.flush() if r.text is not None and reason in ("length", "stop") else ""
        self._count(reason)
        r.emit(Event(text=tail, finish=reason, error=error))

    def _count(self, reason: str) -> None:
        self.stats.finished[reason] += 1


def _key_data(seed: int) -> np.ndarray:
    """A request's key: `generate`'s row 0 for `rng=jax.random.key(seed)`."""
    return np.asarray(_row0(jax.random.key(seed)))


@jax.jit
def _row0(rng: jax.Array) -> jax.Array:
    return jax.random.key_data(row_keys(rng, 1)[0])


def check_fits(prompt_len: int, max_tokens: int, plan: Plan) -> None:
    """A prompt and its answer must fit a slot's cache positions."""
    if prompt_len + max_tokens > plan.context:
        raise GenerateError(f"prompt of {prompt_len} tokens + max_tokens={max_tokens} exceeds the context of "
                            f"{plan.context} tokens per slot")
