"""The compiled generation programs: one forward over new tokens against the cache, prefill, and the two
decode loops (one token per pass, and self-speculative drafting + verification), each a `jax.jit`.

Per-token adaptive compute: after each recurrence the exit criterion decides, for each row on its own,
whether its token is done; rows that exited keep their state while the others go on, inside one
`lax.while_loop`. Loop state is named (`flax.struct` dataclasses); the options that shape the program
are one hashable `Spec` (a compiled program per distinct spec), the values that do not are traced
(`Knobs`: changing them does not recompile).

Prompts of different lengths are right-padded: each row writes its own cache positions, so rows never
see another row's padding and RoPE positions are the row's own. Random draws are keyed by (row key,
position): a token's initial latent and its sample never depend on what else is in the batch, which is
what lets the server (`rdlm.serve`) batch requests and still answer each as `generate` would alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rdlm import model
from rdlm.config import ModelConfig
from rdlm.inference.cache import (DECODE_BLOCK, CacheReader, KVCache, cache_slots, cached_mixer, core_lookup,
                                  init_cache, write_slot)
from rdlm.inference.criteria import CRITERIA
from rdlm.inference.sampling import Sampling, sample_token

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Pass:
    """Static options of one forward over new tokens."""
    max_steps: int  # recurrences (the cap, with an exit criterion; rows may have lower caps: `NewTokens.cap`)
    criteria: tuple[str, ...]  # exit criteria; with several, each row picks one by `Knobs.criterion`
    strategy: str  # cache lookup strategy
    has_past: bool  # False in prefill: nothing is cached yet
    all_logits: bool  # logits of every new token (verification), else of each row's last one
    block: int = DECODE_BLOCK  # cached positions attention reads at a time (only blocks below the longest row)


@dataclasses.dataclass(frozen=True)
class Spec:
    """The options of one generation call that shape its program (hashable: static under jit)."""
    num_steps: int
    max_new_tokens: int
    criterion: str = "none"
    strategy: str = "full"
    sample: bool = False
    continuous: bool = False
    exit_in_prefill: bool = True
    draft_steps: int = 0  # > 0: self-speculative decoding
    lookahead: int = 4  # drafted tokens per verification

    def prefill(self) -> Pass:
        return Pass(self.num_steps, (self.criterion if self.exit_in_prefill else "none",), self.strategy, False, False)

    def decode(self) -> Pass:
        return Pass(self.num_steps, (self.criterion,), self.strategy, True, False)

    def draft(self) -> Pass:
        return Pass(self.draft_steps, ("none",), self.strategy, True, False)

    def verify(self) -> Pass:
        return Pass(self.num_steps, ("none",), self.strategy, True, True)


@struct.dataclass
class Knobs:
    """Traced values (changing them does not recompile): scalars, or one per row `[b]`."""
    init_scale: jax.Array  # initial latent noise (0: zeros)
    threshold: jax.Array  # the exit criterion's
    verification_threshold: jax.Array  # speculative decoding's
    sampling: Sampling
    criterion: jax.Array | None = None  # [b] index into `Pass.criteria` (None: the first)

    def rows(self, i: jax.Array) -> Knobs:
        """The values of rows `i [n]`, as a batch of n."""
        return jax.tree.map(lambda x: x[i] if jnp.ndim(x) else x, self)


INIT, SAMPLE = 0, 1  # the two random streams of a row key


def position_keys(keys: jax.Array, stream: int, positions: jax.Array) -> jax.Array:
    """Keys `[b, ...]` for draws at `positions [b, ...]` of each row: a draw depends on its row key and position only."""
    per_row = jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)
    return jax.vmap(lambda k, p: jax.vmap(lambda q: jax.random.fold_in(k, q))(p.reshape(-1)).reshape(p.shape))(
        per_row, positions)


def sample_at(logits: jax.Array, keys: jax.Array, positions: jax.Array, s: Sampling, sample: bool) -> jax.Array:
    """The tokens [b] at `positions [b]` from their logits [b, v], each drawn with its row's key at its position."""
    return sample_token(logits, position_keys(keys, SAMPLE, positions), s, sample)


def row_keys(rng: jax.Array, b: int) -> jax.Array:
    """One key per row of a batch: row i's draws are those of a batch of one with key `fold_in(rng, i)`."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(b))


@struct.dataclass
class NewTokens:
    """L new tokens per row, run against the cache."""
    ids: jax.Array  # [b, L]
    last: jax.Array  # [b] index of each row's last real token among them
    active: jax.Array  # [b] rows that compute and write the cache
    keys: jax.Array  # [b] row keys: draw each position's initial latent (`Huginn.start`)
    warm: jax.Array | None = None  # [b, L, e] initial latent instead (continuous decoding)
    warm_rows: jax.Array | None = None  # [b] rows that take `warm` (None: all)
    cap: jax.Array | None = None  # [b] each row's recurrence cap (None: `Pass.max_steps`)


@struct.dataclass
class Forward:
    """What a forward over new tokens gives."""
    logits: jax.Array  # fp32 [b, L or 1, v]
    latents: jax.Array  # [b, L, e] final core output
    steps: jax.Array  # [b] recurrences run
    exit_values: jax.Array  # [b, max_steps] the criterion's value after each step (NaN after the exit)
    cache: KVCache  # with the new tokens' entries written for active rows; `length` unchanged


@struct.dataclass
class Recurrence:
    """Loop state of the recurrence over new tokens."""
    t: jax.Array  # steps taken
    state: jax.Array  # [b, L, e] latents
    exited: jax.Array  # [b]
    steps: jax.Array  # [b] recurrences each row ran
    fresh: jax.Array  # [slots, n_core, b, L, 2, h, d] the new tokens' core entries
    criterion: Any  # the exit criterion's carry
    exit_values: jax.Array  # [b, max_steps]


def forward_tokens(params: Params, cache: KVCache, new: NewTokens, knobs: Knobs, cfg: ModelConfig,
                   p: Pass) -> Forward:
    """Run L new tokens per row after `cache.length` cached ones: prelude, the recurrence with its per-row
    exit, coda; their keys and values are written at positions length..length+L-1 of active rows."""
    b, L = new.ids.shape
    T = cache.steps.shape[1]
    positions = cache.length[:, None] + jnp.arange(L)
    rope = model.rope_angles(positions, cfg.head_dim, cfg.rope_base)
    new_mask = jnp.tril(jnp.ones((L, L), bool))[None, None]
    rows = jnp.arange(b)[:, None]
    past = jnp.arange(T)[None] < cache.length[:, None]
    valid = jnp.arange(L)[None] <= new.last[:, None]
    m = model.merge(params, cfg)

    def write_at(live):
        return jnp.where(live[:, None], positions, T)  # out of range: the scatter drops it

    def stacked(kvs: list[jax.Array], like: jax.Array) -> jax.Array:
        """Keys/values of a stack of layers `[n_layers, b, L, 2, h, d]` in the cache dtype."""
        if not kvs:
            return jnp.zeros((0, b, L, *like.shape[-3:]), like.dtype)
        return jnp.stack([kv.astype(like.dtype) for kv in kvs])

    filled = jnp.max(cache.length)

    def layers(kv_cache: jax.Array) -> CacheReader | None:
        """Reads of a prelude or coda cache `[n_layers, b, T, 2, h, d]` (none in a prefill)."""
        if not p.has_past:
            return None
        return lambda i, start, size: jax.lax.dynamic_slice_in_dim(kv_cache[i], start, size, axis=1)

    def mixer(kv_cache: jax.Array) -> model.Mixer:
        return cached_mixer(rope, positions, new_mask, layers(kv_cache), past, filled, cfg.attention, p.block)

    def write(kv_cache, kvs, live):
        """One scatter per layer group (the cache is read-only while the tokens compute, so XLA updates it
        in place instead of copying it per layer and step)."""
        lead = (slice(None),) * (kv_cache.ndim - 5)
        return kv_cache.at[(*lead, rows, write_at(live))].set(kvs, mode="drop")

    def coda_logits(state, every: bool = False):
        """Logits of each row's last new token (of every new token with `every`), and the coda's keys/values."""
        logits, _, kvs = m.readout(state, mixer(cache.coda), last=None if every else new.last)
        return logits, stacked(kvs, cache.coda)

    embedded, prelude_kv = m.run(m.prelude, m.embed(new.ids), mixer(cache.prelude))
    prelude_kv = stacked(prelude_kv, cache.prelude)
    slots = cache.core.shape[0]

    def core_step(t, state, fresh, running):
        """One recurrence; the new keys/values go to `fresh` (rows still running)."""
        slot_idx, exists = core_lookup(p.strategy, t, cache.steps, past, slots)

        def read(i: int, start: jax.Array, size: int) -> jax.Array:
            at = start + jnp.arange(size)
            if jnp.ndim(slot_idx) == 2:  # a slot per position
                return cache.core[slot_idx[:, at], i, rows, at[None]]
            core = cache.core  # one slice of the block read: indexing the slot first would copy its whole length
            return jax.lax.dynamic_slice(core, (slot_idx, i, 0, start, 0, 0, 0), (1, 1, b, size, *core.shape[4:]))[0, 0]

        x, kvs = m.core_step(state, embedded, cached_mixer(rope, positions, new_mask, read if p.has_past else None,
                                                           past & exists, filled, cfg.attention, p.block))
        w_slot = write_slot(p.strategy, t, slots)
        kvs = jnp.where(running[None, :, None, None, None, None], stacked(kvs, fresh), fresh[w_slot])
        return x, fresh.at[w_slot].set(kvs)

    crits = [CRITERIA[name] for name in p.criteria]
    choice = jnp.zeros((b,), jnp.int32) if knobs.criterion is None else knobs.criterion
    cap = jnp.full((b,), p.max_steps, jnp.int32) if new.cap is None else new.cap
    uses_logits = jnp.asarray([c.needs_logits for c in crits])[choice]  # [b]

    def last_logits(state: jax.Array, running: jax.Array) -> jax.Array | None:
        """Each row's last-token logits [b, v], computed only when a running row's criterion reads them."""
        if not any(c.needs_logits for c in crits):
            return None
        if all(c.needs_logits for c in crits):
            return coda_logits(state)[0][:, -1]
        return jax.lax.cond(jnp.any(uses_logits & running), lambda: coda_logits(state)[0][:, -1],
                            lambda: jnp.zeros((b, cfg.vocab_size), jnp.float32))

    def body(r: Recurrence) -> Recurrence:
        running = ~r.exited
        new_state, fresh = core_step(r.t, r.state, r.fresh, running)
        t = r.t + 1
        r = r.replace(t=t, state=jnp.where(running[:, None, None], new_state, r.state), fresh=fresh,
                      steps=jnp.where(running, t, r.steps), exited=r.exited | (running & (t >= cap)))
        if p.criteria == ("none",):
            return r
        logits = last_logits(r.state, running)
        carries, values, exits = [], [], []
        for c, carry in zip(crits, r.criterion):
            carry, value = c.value(carry, r.state, logits, valid)
            carries.append(carry)
            values.append(value)
            exits.append(c.exits(value, knobs.threshold))
        value = jnp.stack(values)[choice, jnp.arange(b)]
        carry = jax.tree.map(lambda n, o: jnp.where(running.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
                             carries, r.criterion)
        return r.replace(criterion=carry, exit_values=r.exit_values.at[:, t - 1].set(jnp.where(running, value, jnp.nan)),
                         exited=r.exited | (jnp.stack(exits)[choice, jnp.arange(b)] & running))

    def draw(key: jax.Array, emb: jax.Array, scale: jax.Array) -> jax.Array:
        return m.start(key, emb, scale)

    scale = jnp.broadcast_to(knobs.init_scale, (b,))
    state0 = jax.vmap(jax.vmap(draw, (0, 0, None)))(position_keys(new.keys, INIT, positions), embedded, scale)
    if new.warm is not None:
        warm_rows = jnp.ones((b,), bool) if new.warm_rows is None else new.warm_rows
        state0 = jnp.where(warm_rows[:, None, None], new.warm, state0)
    state0 = state0.astype(cfg.dtype)
    r = Recurrence(t=jnp.int32(0), state=state0, exited=~new.active, steps=jnp.zeros((b,), jnp.int32),
                   fresh=jnp.zeros((slots, *cache.core.shape[1:3], L, *cache.core.shape[4:]), cache.core.dtype),
                   criterion=[c.init(state0, cfg.vocab_size) for c in crits],
                   exit_values=jnp.full((b, p.max_steps), jnp.nan, jnp.float32))
    r = jax.lax.while_loop(lambda r: (r.t < p.max_steps) & ~jnp.all(r.exited), body, r)
    logits, coda_kv = coda_logits(r.state, p.all_logits)
    live = new.active
    cache = cache.replace(prelude=write(cache.prelude, prelude_kv, live), core=write(cache.core, r.fresh, live),
                          coda=write(cache.coda, coda_kv, live),
                          steps=cache.steps.at[rows, write_at(live)].set(jnp.broadcast_to(r.steps[:, None], (b, L)),
                                                                         mode="drop"))
    return Forward(logits, r.state, r.steps, r.exit_values, cache)


class Generation(NamedTuple):
    """`tokens [b, max_new_tokens]` (-1 after a row stops), `steps` recurrences per token (0 after a stop),
    `lengths [b]` tokens generated (a stop token included), `verify_passes` (speculative decoding only),
    `exit_values [b, max_new_tokens, num_steps]` the exit criterion's value after each recurrence (NaN
    after the exit, and without a criterion; None with speculative decoding)."""
    tokens: np.ndarray
    steps: np.ndarray
    lengths: np.ndarray
    verify_passes: int = 0
    exit_values: np.ndarray | None = None


def prefill(params: Params, prompt: jax.Array, prompt_len: jax.Array, rng: jax.Array, knobs: Knobs,
            cfg: ModelConfig, spec: Spec, T: int) -> tuple[Forward, jax.Array]:
    """The prompts through a fresh cache of length T: (their forward, with `cache.length` set to the prompt
    lengths; each row's last latent [b, 1, e])."""
    b = prompt.shape[0]
    cache = init_cache(cfg, b, T, cache_slots(spec.strategy, spec.num_steps, cfg))
    new = NewTokens(prompt, prompt_len - 1, jnp.ones((b,), bool), row_keys(rng, b))
    out = forward_tokens(params, cache, new, knobs, cfg, spec.prefill())
    last = jnp.take_along_axis(out.latents, (prompt_len - 1)[:, None, None], axis=1)
    return out.replace(cache=out.cache.replace(length=prompt_len)), last


@struct.dataclass
class Decoding:
    """Loop state of token-by-token decoding."""
    i: jax.Array  # tokens generated so far
    token: jax.Array  # [b] the last one
    latent: jax.Array  # [b, 1, e] its final latent (continuous decoding starts from it)
    done: jax.Array  # [b] rows that stopped
    cache: KVCache
    tokens: jax.Array  # [b, max_new_tokens]
    steps: jax.Array  # [b, max_new_tokens]
    exit_values: jax.Array  # [b, max_new_tokens, num_steps]


# `mesh` is static only to key the compile cache: sharding comes from `activate` while tracing.
@functools.partial(jax.jit, static_argnames=("cfg", "spec", "T", "mesh"))
def decode(params: Params, prompt: jax.Array, prompt_len: jax.Array, stop_ids: jax.Array, rng: jax.Array,
           knobs: Knobs, cfg: ModelConfig, spec: Spec, T: int, mesh: Any = None) -> Generation:
    """Prefill, then one token per pass until every row stopped or has `max_new_tokens`."""
    b, n = prompt.shape[0], spec.max_new_tokens
    keys = row_keys(rng, b)
    first, latent = prefill(params, prompt, prompt_len, rng, knobs, cfg, spec, T)
    token = sample_at(first.logits[:, 0], keys, prompt_len, knobs.sampling, spec.sample)
    state = Decoding(i=jnp.int32(1), token=token, latent=latent, done=jnp.isin(token, stop_ids), cache=first.cache,
                     tokens=jnp.full((b, n), -1, jnp.int32).at[:, 0].set(token),
                     steps=jnp.zeros((b, n), jnp.int32).at[:, 0].set(first.steps),
                     exit_values=jnp.full((b, n, spec.num_steps), jnp.nan, jnp.float32).at[:, 0].set(first.exit_values))

    def body(d: Decoding) -> Decoding:
        new = NewTokens(d.token[:, None], jnp.zeros((b,), jnp.int32), ~d.done, keys,
                        d.latent if spec.continuous else None)
        out = forward_tokens(params, d.cache, new, knobs, cfg, spec.decode())
        nxt = jnp.where(d.done, -1, sample_at(out.logits[:, 0], keys, d.cache.length + 1, knobs.sampling, spec.sample))
        return Decoding(i=d.i + 1, token=jnp.where(d.done, d.token, nxt), latent=out.latents,
                        done=d.done | jnp.isin(nxt, stop_ids),
                        cache=out.cache.replace(length=out.cache.length + (~d.done)),
                        tokens=d.tokens.at[:, d.i].set(nxt),
                        steps=d.steps.at[:, d.i].set(jnp.where(d.done, 0, out.steps)),
                        exit_values=d.exit_values.at[:, d.i].set(out.exit_values))

    state = jax.lax.while_loop(lambda d: (d.i < n) & ~jnp.all(d.done), body, state)
    return Generation(state.tokens, state.steps, jnp.sum(state.tokens >= 0, -1), jnp.int32(0), state.exit_values)


@struct.dataclass
class Speculating:
    """Loop state of self-speculative decoding."""
    rounds: jax.Array  # verification passes so far
    pending: jax.Array  # [b] the last accepted token, first input of the next draft
    count: jax.Array  # [b] tokens accepted per row
    done: jax.Array  # [b]
    cache: KVCache
    tokens: jax.Array  # [b, max_new_tokens + lookahead]


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "T", "mesh"))
def decode_speculative(params: Params, prompt: jax.Array, prompt_len: jax.Array, stop_ids: jax.Array,
                       rng: jax.Array, knobs: Knobs, cfg: ModelConfig, spec: Spec, T: int,
                       mesh: Any = None) -> Generation:
    """Draft `lookahead` tokens at `draft_steps`, verify them in one pass at `num_steps`, keep the agreeing prefix.

    The official `generate_speculative`: the verifier's argmax must equal the draft (or, with
    `verification_threshold` < 1, the draft's probability must be >= threshold x the top one); after the
    first disagreement the verifier's own token is taken. Rewinding is setting `length` back: entries
    beyond it (drafts, rejected tokens) are masked and later overwritten.
    """
    b = prompt.shape[0]
    n, A = spec.max_new_tokens, spec.lookahead
    keys = row_keys(rng, b)
    first, _ = prefill(params, prompt, prompt_len, rng, knobs, cfg, spec, T)
    pending = sample_at(first.logits[:, 0], keys, prompt_len, knobs.sampling, spec.sample)
    rows = jnp.arange(b)[:, None]

    def body(s: Speculating) -> Speculating:
        start = s.cache.length
        live = ~s.done & (s.count < n)

        def draft(j, carry):  # one drafted token per pass, cached at draft depth (rewound below)
            cache, drafted = carry
            out = forward_tokens(params, cache, NewTokens(drafted[:, j][:, None], jnp.zeros((b,), jnp.int32), live,
                                                          keys), knobs, cfg, spec.draft())
            token = sample_at(out.logits[:, 0], keys, cache.length + 1, knobs.sampling, spec.sample)
            return out.cache.replace(length=out.cache.length + 1), drafted.at[:, j + 1].set(token)

        drafted = jnp.zeros((b, A + 1), jnp.int32).at[:, 0].set(s.pending)
        cache, drafted = jax.lax.fori_loop(0, A, draft, (s.cache, drafted))
        out = forward_tokens(params, cache.replace(length=start),
                             NewTokens(drafted[:, :A], jnp.full((b,), A - 1, jnp.int32), live, keys), knobs, cfg,
                             spec.verify())
        logits, proposals = out.logits, drafted[:, 1:]
        probs = jax.nn.softmax(logits, -1)
        ok = jnp.where(knobs.verification_threshold >= 1, jnp.argmax(logits, -1) == proposals,
                       jnp.take_along_axis(probs, proposals[..., None], -1)[..., 0]
                       >= knobs.verification_threshold * probs.max(-1))
        agree = jnp.where(jnp.all(ok, -1), A, jnp.argmin(ok, -1).astype(jnp.int32))
        at = jnp.minimum(agree, A - 1)
        fix = sample_at(jnp.take_along_axis(logits, at[:, None, None], 1)[:, 0], keys, start + at + 1, knobs.sampling,
                        spec.sample)
        new = jnp.where(jnp.arange(A)[None] < agree[:, None], proposals, fix[:, None])
        accepted = jnp.minimum(agree + 1, A)
        is_stop = jnp.isin(new, stop_ids) & (jnp.arange(A)[None] < accepted[:, None])
        accepted = jnp.where(jnp.any(is_stop, -1), jnp.argmax(is_stop, -1) + 1, accepted)
        accepted = jnp.where(live, accepted, 0)
        idx = jnp.where(jnp.arange(A)[None] < accepted[:, None], s.count[:, None] + jnp.arange(A)[None], n + A)
        last = jnp.take_along_axis(new, jnp.maximum(accepted - 1, 0)[:, None], 1)[:, 0]
        return Speculating(rounds=s.rounds + 1, pending=jnp.where(live, last, s.pending), count=s.count + accepted,
                           done=s.done | (live & jnp.any(is_stop, -1)),
                           cache=out.cache.replace(length=start + accepted),
                           tokens=s.tokens.at[rows, idx].set(new, mode="drop"))

    state = Speculating(rounds=jnp.int32(0), pending=pending, count=jnp.ones((b,), jnp.int32),
                        done=jnp.isin(pending, stop_ids), cache=first.cache,
                        tokens=jnp.full((b, n + A), -1, jnp.int32).at[:, 0].set(pending))
    state = jax.lax.while_loop(lambda s: jnp.any(~s.done & (s.count < n)), body, state)
    tokens = state.tokens[:, :n]
    return Generation(tokens, jnp.where(tokens >= 0, spec.num_steps, 0), jnp.sum(tokens >= 0, -1), state.rounds, None)
