"""Continuous batching: a fixed number of slots share one static KV cache; a thread keeps them full.

Every engine step is one compiled program (`step`): a chunk of up to `Plan.prefills` prompts is
prefilled, then every decoding slot advances by up to `Plan.tokens` tokens (stopping at a stop id or its
budget), so running requests keep streaming while long prompts are read. What differs between requests
is traced, per slot (`SlotSettings`): position, recurrence cap, exit criterion and threshold, sampling
settings, continuous decoding, random key. The decode computes only as many slots as a bucket needs (1, 4,
16, ... up to all: a lone request does not pay for empty slots); a program per bucket, with and without the
exit criteria, is compiled at start-up and reused for every request. A finished slot is refilled from the
queue at the next step.

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
from rdlm.inference.cache import CACHE_AXES, DECODE_BLOCK, KVCache, cache_slots, init_cache
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
    """What shapes the step programs (static)."""
    slots: int
    context: int  # cache positions per slot (prompt + generated tokens)
    chunk: int  # prompt tokens per prefilled prompt and step
    max_steps: int  # the largest recurrence cap a request may ask for
    strategy: str  # cache lookup strategy (it decides the core cache's layout)
    prefills: int = 4  # prompts prefilled per step
    tokens: int = 4  # tokens decoded per slot and step (one host round trip each `tokens`)
    block: int = DECODE_BLOCK  # cached positions attention reads at a time (only blocks below the longest row)
    criteria: tuple[str, ...] = ("none",)  # exit criteria compiled in: ("none",) or all (`ADAPTIVE`)
    rows: int = 0  # slots the decode computes (`SlotSettings.rows`); 0: all of them

    def adaptive(self, on: bool) -> Plan:
        """The plan of the program with every exit criterion (`on`) or none."""
        return dataclasses.replace(self, criteria=CRITERIA_NAMES if on else ("none",))

    @property
    def buckets(self) -> tuple[int, ...]:
        """Decode row counts compiled: powers of 4 below `slots`, and all slots (a step computes the smallest that
        holds its decoding slots, so a lone request does not pay for the empty slots)."""
        sizes = [1]
        while sizes[-1] * 4 < self.slots:
            sizes.append(sizes[-1] * 4)
        return tuple(n for n in sizes if n < self.slots) + (0,)

    @property
    def prefill_rows(self) -> int:
        """Prompts a step of this bucket prefills: no more than it decodes (a lone request's prefill is one row)."""
        return min(self.prefills, self.rows) if self.rows else self.prefills

    def programs(self) -> list[Plan]:
        """Every step program: each bucket, with and without exit criteria (all compiled at start-up)."""
        return [dataclasses.replace(self.adaptive(on), rows=n) for on in (False, True) for n in self.buckets]


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
    decoding: jax.Array  # [S] slots that decode this step
    budget: jax.Array  # [S] tokens a slot may still make (its first, made by a prefill, included)
    logprobs: jax.Array  # [S] the request wants logprobs (the top-k runs only when one does)
    reset: jax.Array  # [S] slots whose cache restarts (admitted or freed); applied before anything else
    stop_ids: jax.Array  # [n] ids that end an answer (-1: padding)
    rows: jax.Array  # [Plan.rows] the slots a bucketed step computes (prefilled, decoding), ascending, then S


@struct.dataclass
class Chunk:
    """The prompt tokens prefilled this step, one row per prompt (slot S: an unused row)."""
    slots: jax.Array  # [P]
    ids: jax.Array  # [P, C]
    next_ids: jax.Array  # [P, C] the token after each (scored for echo logprobs)
    length: jax.Array  # [P] real tokens in ids (0: unused row)
    final: jax.Array  # [P] the prompt ends here: the slot's first token is sampled


@struct.dataclass
class StepOutput:
    """Per slot, the tokens made this step (-1: none; a prefill's first token comes first), their logprobs,
    top alternatives and recurrences; per prefilled row, each prompt token's logprob given the ones before."""
    token: jax.Array  # [S, K + 1]
    logprob: jax.Array  # [S, K + 1]
    top_ids: jax.Array  # [S, K + 1, TOP]
    top_logprobs: jax.Array  # [S, K + 1, TOP]
    steps: jax.Array  # [S, K + 1]
    chunk_logprob: jax.Array  # [P, C] of next_ids
    chunk_top_ids: jax.Array  # [P, C, TOP]
    chunk_top_logprobs: jax.Array  # [P, C, TOP]


def _batch_axis(axes: tuple[str | None, ...]) -> int:
    return axes.index("batch")


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple)


def _take_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """Rows `[P]` of the cache, by one dynamic slice each (an index past the last slot reads the last slot; such a
    row is only ever written back unchanged). A gather on the batch axis would transpose the whole cache."""
    def take(x, axes):
        return jnp.concatenate([jax.lax.dynamic_slice_in_dim(x, jnp.minimum(r, x.shape[_batch_axis(axes)] - 1), 1,
                                                             _batch_axis(axes)) for r in rows], _batch_axis(axes))
    return jax.tree.map(take, cache, CACHE_AXES, is_leaf=_is_axes)


def _put_rows(cache: KVCache, new: KVCache, rows: jax.Array) -> KVCache:
    """Write rows `[P]` back in place, the last first: unused rows (after the used ones, holding what they read)
    never overwrite a used row's new entries."""
    def put(x, r, axes):
        axis = _batch_axis(axes)
        for j in reversed(range(len(rows))):
            row = jax.lax.dynamic_slice_in_dim(r, j, 1, axis)
            x = jax.lax.dynamic_update_slice_in_dim(x, row, jnp.minimum(rows[j], x.shape[axis] - 1), axis)
        return x
    return jax.tree.map(put, cache, new, CACHE_AXES, is_leaf=_is_axes)


def _scored(logits: jax.Array, chosen: jax.Array, want: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logprob of `chosen` [n], top ids [n, TOP], their logprobs) from fp32 logits [n, v]; the top-k only when
    `want`."""
    logp = jax.nn.log_softmax(logits, -1)
    n = logits.shape[0]
    top, ids = jax.lax.cond(want, lambda: tuple(jax.lax.top_k(logp, TOP_LOGPROBS)),
                            lambda: (jnp.zeros((n, TOP_LOGPROBS)), jnp.zeros((n, TOP_LOGPROBS), jnp.int32)))
    return jnp.take_along_axis(logp, jnp.maximum(chosen, 0)[:, None], -1)[:, 0], ids.astype(jnp.int32), top


def _sample(logits: jax.Array, keys: jax.Array, positions: jax.Array, sampling: Sampling) -> jax.Array:
    """Tokens [n]: argmax, unless a row samples (the sort over the vocabulary only runs then)."""
    return jax.lax.cond(jnp.any(sampling.temperature > 0),
                        lambda: sample_at(logits, keys, positions, sampling, True),
                        lambda: sample_at(logits, keys, positions, sampling, False))


@functools.partial(jax.jit, static_argnames=("cfg", "plan"), donate_argnums=(1,))
def step(params: Params, state: SlotState, settings: SlotSettings, chunk: Chunk, cfg: ModelConfig,
         plan: Plan) -> tuple[SlotState, StepOutput]:
    """One engine step: prefill the chunk's prompts into their slots, then decode up to `plan.tokens` tokens for
    every decoding slot (a slot whose prompt ended in this chunk included). A slot stops at a stop id or at its
    budget; the step stops early when every slot has."""
    S, C, K, P, TOP = plan.slots, plan.chunk, plan.tokens, plan.prefill_rows, TOP_LOGPROBS
    keys = jax.random.wrap_key_data(settings.keys)
    cache = state.cache.replace(length=jnp.where(settings.reset, 0, state.cache.length))
    knobs = settings.knobs if len(plan.criteria) > 1 else settings.knobs.replace(criterion=None)
    used = chunk.length > 0

    at = jnp.minimum(chunk.slots, S - 1)
    wants = settings.logprobs[at] & used
    row_keys_ = keys[at]
    row_knobs = knobs.rows(at).replace(criterion=None)  # no exit in a prefill: see the top

    def prefill(rows: KVCache):
        new = NewTokens(chunk.ids, jnp.maximum(chunk.length - 1, 0), used, row_keys_, cap=settings.cap[at])
        out = forward_tokens(params, rows, new, row_knobs, cfg,
                             Pass(plan.max_steps, ("none",), plan.strategy, True, True, plan.block))
        lp, top_ids, top = _scored(out.logits.reshape(P * C, -1), chunk.next_ids.reshape(-1), jnp.any(wants))
        position = rows.length + chunk.length  # where each first generated token goes
        last = jnp.take_along_axis(out.logits, new.last[:, None, None], 1)[:, 0]
        token = _sample(last, row_keys_, position, row_knobs.sampling)
        first = (token, *_scored(last, token, jnp.any(wants)), out.steps)
        latent = jnp.take_along_axis(out.latents, new.last[:, None, None], 1)
        rows = out.cache.replace(length=jnp.where(used, position, rows.length))
        return rows, (lp.reshape(P, C), top_ids.reshape(P, C, TOP), top.reshape(P, C, TOP)), first, latent

    def no_prefill(rows: KVCache):
        return (rows, (jnp.zeros((P, C)), jnp.zeros((P, C, TOP), jnp.int32), jnp.zeros((P, C, TOP))),
                (jnp.full((P,), -1, jnp.int32), jnp.zeros((P,)), jnp.zeros((P, TOP), jnp.int32), jnp.zeros((P, TOP)),
                 jnp.zeros((P,), jnp.int32)), jnp.zeros((P, 1, cfg.n_embd), cfg.dtype))

    # A bucketed step (`plan.rows` < S) computes a view of its slots (the prefilled and decoding ones, then
    # padding), taken from the cache once and put back once: a second take and put would copy the whole cache.
    every = not plan.rows  # buckets are below S
    sel = jnp.arange(S) if every else jnp.minimum(settings.rows, S - 1)
    back = sel if every else settings.rows  # padding (S) is dropped when the rows go back
    view = cache if every else _take_rows(cache, settings.rows)
    local = chunk.slots if every else jnp.where(  # the chunk's rows in the view (unused ones past its end)
        used, jnp.argmax(settings.rows[None] == chunk.slots[:, None], 1), plan.rows)

    def pick(x: jax.Array) -> jax.Array:
        return x if every else x[sel]

    # only the prefilled rows pass through the conditional: the whole cache would be copied in and out of it
    rows, scored_chunk, first, first_latent = jax.lax.cond(jnp.any(used), prefill, no_prefill,
                                                           _take_rows(view, local))
    view = _put_rows(view, rows, local)
    starts = jnp.zeros((S,), bool).at[chunk.slots].set(used & chunk.final, mode="drop")
    into = jnp.where(used & chunk.final, chunk.slots, S)  # the starting rows' slots (others dropped)
    token = state.token.at[into].set(first[0], mode="drop")
    latent = state.latent.at[into].set(first_latent, mode="drop")
    made = [jnp.full((S, K + 1), -1, jnp.int32), jnp.zeros((S, K + 1)), jnp.zeros((S, K + 1, TOP), jnp.int32),
            jnp.zeros((S, K + 1, TOP)), jnp.zeros((S, K + 1), jnp.int32)]
    made = [m.at[into, 0].set(f, mode="drop") for m, f in zip(made, first)]
    live = settings.decoding | starts
    done = ~live | (starts & (jnp.isin(token, settings.stop_ids) | (settings.budget <= 1))) | (settings.budget <= 0)
    count = starts.astype(jnp.int32)  # tokens made per slot this step
    any_logprobs = jnp.any(settings.logprobs & live)

    b_keys, b_knobs = pick(keys), knobs if every else knobs.rows(sel)
    b_budget, b_cap, b_warm = pick(settings.budget), pick(settings.cap), pick(settings.continuous)
    done = pick(done) | (back >= S)

    def decode_one(carry):
        k, cache, token, latent, done, count, made = carry
        new = NewTokens(token[:, None], jnp.zeros_like(token), ~done, b_keys, warm=latent, warm_rows=b_warm, cap=b_cap)
        out = forward_tokens(params, cache, new, b_knobs, cfg, Pass(plan.max_steps, plan.criteria, plan.strategy, True,
                                                                    False, plan.block))
        logits = out.logits[:, 0]
        nxt = _sample(logits, b_keys, cache.length + 1, b_knobs.sampling)
        lp, top_ids, top = _scored(logits, nxt, any_logprobs)
        running = ~done
        col = jnp.where(running, k + 1, K + 1)  # column k + 1 (column 0: a prefill's first token); else dropped
        rows = jnp.arange(token.shape[0])
        made = [m.at[rows, col].set(v, mode="drop") for m, v in zip(made, (nxt, lp, top_ids, top, out.steps))]
        count = count + running
        cache = out.cache.replace(length=cache.length + running)
        done = done | (running & (jnp.isin(nxt, settings.stop_ids) | (count >= b_budget)))
        return (k + 1, cache, jnp.where(running, nxt, token), jnp.where(running[:, None, None], out.latents, latent),
                done, count, made)

    carry = (jnp.int32(0), view, pick(token), pick(latent), done, pick(count), [pick(m) for m in made])
    _, view, b_token, b_latent, _, _, b_made = jax.lax.while_loop(lambda c: (c[0] < K) & ~jnp.all(c[4]), decode_one,
                                                                  carry)
    if every:
        return SlotState(view, b_token, b_latent), StepOutput(*b_made, *scored_chunk)
    made = [m.at[back].set(v, mode="drop") for m, v in zip(made, b_made)]
    return (SlotState(_put_rows(cache, view, settings.rows), token.at[back].set(b_token, mode="drop"),
                      latent.at[back].set(b_latent, mode="drop")), StepOutput(*made, *scored_chunk))


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
        stops = [] if tokenizer is None else list(tokenizer.stop_ids)
        self._stop_ids = np.asarray(stops + [-1] * (8 - len(stops) % 8), np.int32)  # -1: padding, never made
        self.error: str | None = None
        self.compiles = 0  # programs `step` holds after warm-up (the metrics report any compiled since)

    # -- the consumer's side (any thread)

    def submit(self, request: Request) -> None:
        """Queue a request, or raise `QueueFull` / `Draining`."""
        with self._wake:
            if self._draining or self._stopped:
                raise Draining("the server is shutting down")
            if self.error is not None or (self._thread is not None and not self._thread.is_alive()):
                raise Draining(f"the engine failed ({self.error}); restart the server")  # nothing would answer
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
        """Compile every step program (`Plan.programs`) before the first request."""
        for plan in self.plan.programs():
            for _ in range(2):  # the second call sees the first's outputs as inputs (committed arrays): its own entry
                self.state, out = step(self.params, self.state,
                                       self._settings(np.zeros(self.plan.slots, bool), rows=plan.rows),
                                       self._chunk([], plan.prefill_rows), cfg=self.cfg, plan=plan)
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

    def _settings(self, decoding: np.ndarray, budget: np.ndarray | None = None, rows: int = 0,
                  computed: list[int] = ()) -> SlotSettings:
        """The step's per-slot values; the step computes `rows` slots (0: all): `computed`, then padding."""
        S = self.plan.slots
        o = [r.options if r is not None else Options() for r in self.slots]
        keys = np.stack([r.key if r is not None else np.zeros(self._key_shape, np.uint32) for r in self.slots])
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
                            continuous=col(lambda x: x.continuous, bool), decoding=decoding,
                            budget=np.zeros((S,), np.int32) if budget is None else budget,
                            logprobs=col(lambda x: x.logprobs > 0 or x.echo, bool), reset=reset,
                            stop_ids=self._stop_ids,
                            rows=np.asarray((sorted(computed) + [S] * (rows - len(computed))) if rows else [],
                                            np.int32))

    def _chunk(self, slots: list[int], P: int) -> Chunk:
        """The next `plan.chunk` prompt tokens of each of `slots` (at most P), in P rows."""
        C, S = self.plan.chunk, self.plan.slots
        ids, next_ids = np.zeros((P, C), np.int32), np.full((P, C), -1, np.int32)
        rows, length, final = np.full((P,), S, np.int32), np.zeros((P,), np.int32), np.zeros((P,), bool)
        for j, i in enumerate(slots):
            r = self.slots[i]
            part = r.prompt[r.prefilled:r.prefilled + C]
            after = r.prompt[r.prefilled + 1:r.prefilled + C + 1]
            rows[j], length[j], final[j] = i, len(part), r.prefilled + len(part) == len(r.prompt)
            ids[j, :len(part)] = part
            next_ids[j, :len(after)] = after
        return Chunk(rows, ids, next_ids, length, final)

    def _step(self) -> None:
        busy = [(i, r) for i, r in enumerate(self.slots) if r is not None]
        prefilling = sorted((i for i, r in busy if r.prefilled < len(r.prompt)), key=lambda i: self.slots[i].arrived)
        decoding = np.zeros((self.plan.slots,), bool)
        budget = np.zeros((self.plan.slots,), np.int32)
        for i, r in busy:
            budget[i] = min(r.options.max_tokens, self.plan.context - len(r.prompt)) - r.generated
            decoding[i] = r.prefilled == len(r.prompt)
        adaptive = any(r.options.exit_criterion != "none" for _, r in busy)
        for rows in self.plan.buckets:  # the smallest program that holds the oldest prompts and the decoding slots
            plan = dataclasses.replace(self.plan.adaptive(adaptive), rows=rows)
            chunk = self._chunk(prefilling[:plan.prefill_rows], plan.prefill_rows)
            computed = [i for i, r in busy if decoding[i]] + prefilling[:plan.prefill_rows]
            if not rows or (len(computed) <= rows and len(prefilling) <= plan.prefill_rows):
                break
        self.state, out = step(self.params, self.state, self._settings(decoding, budget, rows, computed), chunk,
                               cfg=self.cfg, plan=plan)
        out = jax.device_get(out)
        now = time.monotonic()
        for j, i in enumerate(chunk.slots):
            if chunk.length[j]:
                r = self.slots[i]
                if r.options.echo:
                    self._echo(r, chunk, out, j)
                r.prefilled += int(chunk.length[j])
                self.stats.prompt_tokens += int(chunk.length[j])
        made = steps = 0
        for i, r in busy:
            got = out.token[i] >= 0
            if got.any():
                made += int(got.sum())
                steps += int(out.steps[i][got].sum())
                self._tokens(i, r, out, got, now)
        self.stats.steps_run += 1
        self.stats.generated_tokens += made
        self.stats.recurrence_steps += steps
        self.stats.recent.append((now, made, steps))

    def _echo(self, r: Request, chunk: Chunk, out: StepOutput, j: int) -> None:
        """Row j's prompt tokens with the logprob of each given the ones before (None for the prompt's first)."""
        n = int(chunk.length[j])
        scored = [(float(out.chunk_logprob[j, t]), self._top(out.chunk_top_ids[j, t], out.chunk_top_logprobs[j, t], r))
                  for t in range(n)]
        first = r.scored or (None, None)
        r.scored = scored[-1]
        r.emit(Event(tokens=[int(t) for t in chunk.ids[j, :n]], logprobs=[first[0]] + [x[0] for x in scored[:-1]],
                     top=[first[1]] + [x[1] for x in scored[:-1]], steps=[0] * n, prompt=True))

    @staticmethod
    def _top(ids: np.ndarray, lps: np.ndarray, r: Request) -> list[tuple[int, float]]:
        return [(int(a), float(b)) for a, b in zip(ids[:r.options.logprobs], lps[:r.options.logprobs])]

    def _tokens(self, i: int, r: Request, out: StepOutput, got: np.ndarray, now: float) -> None:
        """A slot's new tokens: stream them, then end the request on a stop id, a stop string or its length."""
        if r.first_token_at is None:
            r.first_token_at = now
        if r.options.max_tokens == 0:  # scoring only (echo): the token is not part of the answer
            self._finish(i, "length")
            return
        tokens, logprobs, top, steps = [], [], [], []
        text, stopped = "", False
        for k in np.flatnonzero(got):
            token = int(out.token[i, k])
            r.generated += 1
            if self.tok is not None and token in self.tok.stop_ids:
                stopped = True
            elif r.text is not None:
                delta, stopped = r.text.push(token)
                text += delta
            tokens.append(token)
            logprobs.append(float(out.logprob[i, k]))
            top.append(self._top(out.top_ids[i, k], out.top_logprobs[i, k], r))
            steps.append(int(out.steps[i, k]))
            if stopped:
                break
        r.emit(Event(text=text, tokens=tokens, logprobs=logprobs, top=top, steps=steps))
        if stopped:
            self._finish(i, "stop")
        elif r.generated >= min(r.options.max_tokens, self.plan.context - len(r.prompt)):
            self._finish(i, "length")

    def _finish(self, i: int, reason: str, error: str | None = None) -> None:
        r, self.slots[i] = self.slots[i], None
        self._reset.add(i)  # its stale length would make attention read its positions
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
