"""Cached generation for Huginn: prefill and decode in one jitted program, with per-token exits.

Every token runs prelude -> r recurrences of the core -> coda. The KV cache holds one entry per
(recurrence step, core layer) plus one per prelude and coda layer, as the official model does; all
shapes are static (`KVCache`), so the whole generation, prompt to last token, is one `jax.jit`.

Per-token adaptive compute: after each recurrence an exit criterion (the official ones, with their
default thresholds) decides, for each row of the batch on its own, whether the token is done. Rows
that exited keep their state while the others go on, inside one `lax.while_loop`. A token that exits
after k steps leaves no cache entries for steps >= k; a `cache_strategy` says what later tokens attend
to instead (the official lookup strategies; see `STRATEGIES`). `continuous=True` warm-starts each
token's latent from the previous token's final one; `draft_steps` turns on self-speculative decoding
(draft with few steps, verify a block with `num_steps`, keep the agreeing prefix).

Prompts of different lengths are right-padded: each row writes its own cache positions, so rows never
see another row's padding and RoPE positions are the row's own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdlm import model
from rdlm.checkpoint import CONFIG_FILE, PARAMS_DIR, load_model, load_run
from rdlm.config import Config, ModelConfig, RulesConfig, with_overrides
from rdlm.errors import ArgumentParser, RdlmError, cli
from rdlm.hf import load_hf_checkpoint
from rdlm.params import abstract_params
from rdlm.sharding import activate, constrain, make_mesh, named, param_partition_specs, shards
from rdlm.tokenizer import Tokenizer, load_tokenizer

Params = dict[str, Any]


class GenerateError(RdlmError, ValueError):
    """Bad generation input; the message names the argument and its valid range."""


# ---- exit criteria -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Criterion:
    """An exit test run after every recurrence: `value(carry, latents, logits, valid) -> (carry, value [b])`.

    A token exits when its value drops below the threshold, or, for a `counting` criterion, reaches it.
    `latents [b, s, e]` are the block's states, `logits [b, v]` those of each row's last token (only
    computed when `needs_logits`), `valid [b, s]` marks real (unpadded) positions; latent criteria
    average over them, as the official does over the sequence.
    """
    default: float  # the official "auto" threshold
    valid: tuple[float, float]  # (exclusive lower, inclusive upper) bound of the threshold
    needs_logits: bool
    init: Callable[[jax.Array, int], Any]  # (initial latents, vocab size) -> carry
    value: Callable[..., tuple[Any, jax.Array]]
    counting: bool = False  # an integer count: exit at >= threshold

    def exits(self, value: jax.Array, threshold: jax.Array) -> jax.Array:
        return value >= threshold if self.counting else value < threshold


def _masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(valid, x, 0.0), -1) / jnp.sum(valid, -1)


def _norm(x: jax.Array) -> jax.Array:
    return jnp.linalg.norm(x.astype(jnp.float32), axis=-1)


def _batch(latents: jax.Array, value: float, dtype: Any = jnp.float32) -> jax.Array:
    return jnp.full((latents.shape[0],), value, dtype)


def _entropy_diff(prev, latents, logits, valid):
    probs = jax.nn.softmax(logits, -1)
    entropy = -jnp.sum(probs * jnp.log(probs + 1e-10), -1)
    return entropy, jnp.abs(entropy - prev)


def _latent_diff(prev, latents, logits, valid):
    return latents, _masked_mean(_norm(latents - prev) / _norm(latents), valid)


def _cosine(prev, latents, logits, valid):
    cos = jnp.sum(latents.astype(jnp.float32) * prev.astype(jnp.float32), -1) / _norm(latents) / _norm(prev)
    return latents, 1.0 - _masked_mean(cos, valid)


def _minp_log_probs(logits: jax.Array) -> jax.Array:
    """The official minp-kl view: probabilities below 0.1 x max set to 1/V, renormalised."""
    probs = jax.nn.softmax(logits, -1)
    probs = jnp.where(probs < 0.1 * probs.max(-1, keepdims=True), 1.0 / probs.shape[-1], probs)
    return jnp.log(probs / probs.sum(-1, keepdims=True))


def _kl(log_probs_fn: Callable[[jax.Array], jax.Array]):
    def value(prev, latents, logits, valid):
        log_probs = log_probs_fn(logits)
        return log_probs, jnp.sum(jnp.exp(prev) * (prev - log_probs), -1)  # KL(previous || current)
    return value


def _argmax_stability(carry, latents, logits, valid):
    prev, stable = carry
    current = jnp.argmax(logits, -1).astype(jnp.int32)
    stable = jnp.where(current == prev, stable + 1, 0)
    return (current, stable), stable.astype(jnp.float32)


def _uniform(latents: jax.Array, vocab: int) -> jax.Array:
    return jnp.full((latents.shape[0], vocab), -math.log(vocab), jnp.float32)


CRITERIA: dict[str, Criterion] = {
    "entropy-diff": Criterion(1e-3, (0.0, math.inf), True, lambda s, v: _batch(s, 100.0), _entropy_diff),
    "latent-diff": Criterion(0.03, (0.0, math.inf), False, lambda s, v: s, _latent_diff),
    "kl": Criterion(1e-3, (0.0, math.inf), True, _uniform, _kl(lambda x: jax.nn.log_softmax(x, -1))),
    "minp-kl": Criterion(1e-5, (0.0, math.inf), True, _uniform, _kl(_minp_log_probs)),
    "argmax-stability": Criterion(5, (0.0, math.inf), True,
                                  lambda s, v: (_batch(s, -1, jnp.int32), _batch(s, 0, jnp.int32)), _argmax_stability,
                                  counting=True),
    "cosine": Criterion(1e-3, (0.0, 2.0), False, lambda s, v: s, _cosine),
    "none": Criterion(0.0, (0.0, 0.0), False, lambda s, v: (), lambda c, s, lg, va: (c, _batch(s, 0.0))),
}


# ---- the KV cache and its lookup strategies ------------------------------------------------------

# How a token at recurrence step t finds keys/values of an earlier token that ran `steps` recurrences
# (entries exist for steps 0..steps-1). "full" and "skip" attend only to entries that exist (the
# official dynamic cache does the same for "full"); the m4 strategies substitute the same core layer
# at another step (official names: huginn's core has 4 layers, here it is any core depth).
STRATEGIES = ("full", "skip", "latest-m4", "available-m4", "always-last-m4", "compress-s<n>", "compress-anchor")
ANCHOR_STEPS = 8  # compress-anchor keeps the first 8 recurrences, then shares one slot (official)
MAX_STEPS = 2**31 - 1  # recurrence counters are int32


class KVCache(NamedTuple):
    """Static-shape cache. kv tensors are `[..., batch, length, 2 (k, v), heads, head_dim]`."""
    prelude: jax.Array  # [n_prelude, b, T, 2, h, d]
    core: jax.Array  # [slots, n_core, b, T, 2, h, d]
    coda: jax.Array  # [n_coda, b, T, 2, h, d]
    steps: jax.Array  # [b, T] recurrences each cached position ran
    length: jax.Array  # [b] positions filled per row


def cache_slots(strategy: str, num_steps: int, cfg: ModelConfig) -> int:
    """Recurrence slots of the core cache: one per step unless a compress strategy shares them."""
    if strategy.startswith("compress-s"):
        n = int(strategy.removeprefix("compress-s"))  # counted in core-layer entries, as the official
        return min(n // cfg.n_layers_in_recurrent_block, num_steps)
    if strategy == "compress-anchor":
        return min(num_steps, ANCHOR_STEPS + 1)
    return num_steps


KV_AXES = ("batch", "length", None, "heads", "head_dim")  # logical axes of one layer's cache


def init_cache(cfg: ModelConfig, batch: int, length: int, slots: int) -> KVCache:
    """Zeros, sharded by the active mesh rules (batch over data, heads over tensor by default)."""
    kv = (batch, length, 2, cfg.n_heads, cfg.head_dim)
    dt = jnp.dtype(cfg.dtype)
    return KVCache(constrain(jnp.zeros((cfg.n_layers_in_prelude, *kv), dt), (None, *KV_AXES)),
                   constrain(jnp.zeros((slots, cfg.n_layers_in_recurrent_block, *kv), dt), (None, None, *KV_AXES)),
                   constrain(jnp.zeros((cfg.n_layers_in_coda, *kv), dt), (None, *KV_AXES)),
                   constrain(jnp.zeros((batch, length), jnp.int32), ("batch", "length")),
                   constrain(jnp.zeros((batch,), jnp.int32), ("batch",)))


def cache_bytes(cfg: ModelConfig, batch: int, length: int, num_steps: int, strategy: str) -> int:
    """Bytes `init_cache` allocates for this strategy (what `tools/bench.py decode` reports), without tracing it."""
    slots = cache_slots(strategy, num_steps, cfg)
    layers = cfg.n_layers_in_prelude + slots * cfg.n_layers_in_recurrent_block + cfg.n_layers_in_coda
    return layers * _kv_bytes(cfg, batch) * length + batch * (length + 1) * 4  # + steps [b, T], length [b]


def _kv_bytes(cfg: ModelConfig, batch: int) -> int:
    """Bytes of one layer's keys and values at one position."""
    return batch * 2 * cfg.n_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def _write_slot(strategy: str, t: jax.Array, slots: int) -> jax.Array:
    if strategy.startswith("compress-s"):
        return t % slots
    return jnp.minimum(t, slots - 1)  # = t except for compress-anchor


def _core_lookup(strategy: str, t: jax.Array, steps: jax.Array, past: jax.Array,
                 slots: int) -> tuple[jax.Array, jax.Array]:
    """(slot to read: scalar or per position [b, T], entry exists [b, T]) for past positions at step t.

    `steps [b, T]` is meaningful only where `past` (positions below the row's length)."""
    if strategy in ("latest-m4", "available-m4"):  # the newest entry at or before step t
        return jnp.minimum(t, steps - 1), steps > 0
    if strategy == "always-last-m4":  # the position's deepest entry, once any past position lacks step t
        missing = jnp.any(past & (steps <= t), axis=1, keepdims=True)
        return jnp.where(missing, steps - 1, t), steps > 0
    slot = _write_slot(strategy, t, slots)
    return slot, steps > slot


def _attend_cached(q: jax.Array, k: jax.Array, v: jax.Array, block_mask: jax.Array, past_kv: jax.Array,
                   past_mask: jax.Array) -> jax.Array:
    """One softmax over the valid cached positions and the block itself, without concatenating keys/values."""
    past_scores = model.attention_scores(q, past_kv[:, :, 0], past_mask[:, None, None, :])
    scores = jnp.concatenate([past_scores, model.attention_scores(q, k, block_mask)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    T = past_scores.shape[-1]
    return (jnp.einsum("bnqk,bknd->bqnd", probs[..., :T], past_kv[:, :, 1])
            + jnp.einsum("bnqk,bknd->bqnd", probs[..., T:], v))


def _cached_mix(rope, block_mask, past_kv: Callable[[int], jax.Array | None], past_mask: jax.Array) -> model.Mixer:
    """The token mixer of cached layers: attention of the new block over (valid cached positions of layer i,
    `past_kv(i)`; the block itself); its aux output is the block's keys and values `[b, L, 2, h, d]`."""
    def mix(i, attn, h):
        q, k, v = attn.qkv(h, rope)
        cached = past_kv(i)
        y = model.attend(q, k, v, block_mask) if cached is None else _attend_cached(q, k, v, block_mask, cached,
                                                                                     past_mask)
        return attn.out(y), jnp.stack([k, v], axis=2)
    return mix


# ---- one forward over a block of new tokens ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    """Static settings of one compiled generation program."""
    num_steps: int
    max_new_tokens: int
    criterion: str = "none"
    strategy: str = "full"
    sample: bool = False
    continuous: bool = False
    exit_in_prefill: bool = True
    draft_steps: int = 0  # > 0: self-speculative decoding
    lookahead: int = 4


class Block(NamedTuple):
    """Per-call inputs of `forward_block` (traced)."""
    ids: jax.Array  # [b, L]
    last: jax.Array  # [b] index of each row's last real token in the block
    active: jax.Array  # [b] rows that compute and write the cache
    init_state: jax.Array  # [b, L, e]


def forward_block(params: Params, cache: KVCache, blk: Block, threshold: jax.Array, cfg: ModelConfig, opts: Options,
                  *, max_steps: int, criterion: str, has_past: bool,
                  all_logits: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, KVCache]:
    """Run a block of L new tokens per row after `cache.length` cached ones.

    Returns (fp32 logits [b, L or 1, v], final latents [b, L, e], steps run [b], the criterion's value
    after each step [b, max_steps] (NaN after the exit), cache with the block's entries written at
    positions length..length+L-1 of active rows; `length` is unchanged).
    """
    b, L = blk.ids.shape
    T = cache.steps.shape[1]
    positions = cache.length[:, None] + jnp.arange(L)
    rope = model.rope_angles(positions, cfg.head_dim, cfg.rope_base)
    block_mask = jnp.tril(jnp.ones((L, L), bool))[None, None]
    rows = jnp.arange(b)[:, None]

    def write_at(live):
        return jnp.where(live[:, None], positions, T)  # out of range: the scatter drops it

    past = jnp.arange(T)[None] < cache.length[:, None]
    valid = jnp.arange(L)[None] <= blk.last[:, None]
    crit = CRITERIA[criterion]

    m = model.merge(params, cfg)

    def stacked(kvs: list[jax.Array], like: jax.Array) -> jax.Array:
        """Keys/values of a stack of layers `[n_layers, b, L, 2, h, d]` in the cache dtype."""
        return jnp.stack([kv.astype(like.dtype) for kv in kvs]) if kvs else jnp.zeros((0, b, L, *like.shape[-3:]),
                                                                                        like.dtype)

    def cached(kv_cache: jax.Array) -> model.Mixer:
        return _cached_mix(rope, block_mask, lambda i: kv_cache[i] if has_past else None, past)

    def write(kv_cache, kvs, live):
        """One scatter per group and block (the cache is read-only while the block computes, so XLA
        updates it in place instead of copying it per layer and step)."""
        lead = (slice(None),) * (kv_cache.ndim - 5)
        return kv_cache.at[(*lead, rows, write_at(live))].set(kvs, mode="drop")

    def coda_logits(state):
        logits, _, kvs = m.readout(state, cached(cache.coda), last=None if all_logits else blk.last)
        return logits, stacked(kvs, cache.coda)

    embedded, prelude_kv = m.run(m.prelude, m.embed(blk.ids), cached(cache.prelude))
    prelude_kv = stacked(prelude_kv, cache.prelude)
    slots = cache.core.shape[0]

    def core_step(t, state, fresh, running):
        """One recurrence; the block's keys/values go to `fresh [slots, n_core, b, L, 2, h, d]` (rows still running)."""
        slot_idx, exists = _core_lookup(opts.strategy, t, cache.steps, past, slots)

        def past_kv(i: int) -> jax.Array | None:
            if not has_past:
                return None
            if jnp.ndim(slot_idx) == 2:  # a slot per position
                return cache.core[slot_idx, i, rows, jnp.arange(T)[None]]
            return cache.core[slot_idx, i]

        x, kvs = m.core_step(state, embedded, _cached_mix(rope, block_mask, past_kv, past & exists))
        w_slot = _write_slot(opts.strategy, t, slots)
        kvs = jnp.where(running[None, :, None, None, None, None], stacked(kvs, fresh), fresh[w_slot])
        return x, fresh.at[w_slot].set(kvs)

    def body(carry):
        t, state, exited, steps, core, crit_carry, values = carry
        running = ~exited
        new_state, core = core_step(t, state, core, running)  # core: this block's fresh entries
        state = jnp.where(running[:, None, None], new_state, state)
        steps = jnp.where(running, t + 1, steps)
        if criterion != "none":
            logits = coda_logits(state)[0][:, -1] if crit.needs_logits else None
            new_carry, value = crit.value(crit_carry, state, logits, valid)
            crit_carry = jax.tree.map(lambda n, o: jnp.where(running.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
                                      new_carry, crit_carry)
            values = values.at[:, t].set(jnp.where(running, value, jnp.nan))
            exited = exited | (crit.exits(value, threshold) & running)
        return t + 1, state, exited, steps, core, crit_carry, values

    state0 = (embedded if cfg.injection == "none" else blk.init_state).astype(cfg.dtype)
    fresh = jnp.zeros((slots, *cache.core.shape[1:3], L, *cache.core.shape[4:]), cache.core.dtype)
    carry = (jnp.int32(0), state0, ~blk.active, jnp.zeros((b,), jnp.int32), fresh, crit.init(state0, cfg.vocab_size),
             jnp.full((b, max_steps), jnp.nan, jnp.float32))
    _, state, _, steps, fresh, _, values = jax.lax.while_loop(lambda c: (c[0] < max_steps) & ~jnp.all(c[2]), body,
                                                              carry)
    logits, coda_kv = coda_logits(state)
    live = blk.active
    return logits, state, steps, values, KVCache(
        write(cache.prelude, prelude_kv, live), write(cache.core, fresh, live), write(cache.coda, coda_kv, live),
        cache.steps.at[rows, write_at(live)].set(jnp.broadcast_to(steps[:, None], (b, L)), mode="drop"), cache.length)


# ---- sampling ------------------------------------------------------------------------------------


class Sampling(NamedTuple):
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array


def sample_token(logits: jax.Array, key: jax.Array, s: Sampling, sample: bool) -> jax.Array:
    """Next ids [b] from fp32 logits [b, v]: argmax, or the official order temperature -> top-k -> top-p -> min-p."""
    if not sample:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    probs = jax.nn.softmax(logits / s.temperature, -1)
    order = jnp.argsort(-probs, -1)
    sorted_probs = jnp.take_along_axis(probs, order, -1)
    k_index = jnp.full((probs.shape[0], 1), jnp.clip(s.top_k - 1, 0, probs.shape[-1] - 1))
    kth = jnp.take_along_axis(sorted_probs, k_index, -1)
    probs = jnp.where((s.top_k > 0) & (probs < kth), 0.0, probs)
    sorted_probs = jnp.take_along_axis(probs, order, -1)
    drop_sorted = (jnp.cumsum(sorted_probs, -1) > s.top_p).at[:, 0].set(False) & (s.top_p < 1)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(probs.shape[0])[:, None], order].set(drop_sorted)
    probs = jnp.where(drop, 0.0, probs)
    probs = jnp.where(probs < s.min_p * probs.max(-1, keepdims=True), 0.0, probs)
    return jax.random.categorical(key, jnp.log(probs), -1).astype(jnp.int32)


# ---- whole generations under one jit -------------------------------------------------------------


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


def _prefill(params, prompt, prompt_len, rng, init_scale, threshold, cfg, opts, T):
    b, Lp = prompt.shape
    cache = init_cache(cfg, b, T, cache_slots(opts.strategy, opts.num_steps, cfg))
    state0 = model.initial_state(jax.random.fold_in(rng, 0), (b, Lp, cfg.n_embd), cfg, init_scale)
    blk = Block(prompt, prompt_len - 1, jnp.ones((b,), bool), state0)
    criterion = opts.criterion if opts.exit_in_prefill else "none"
    logits, state, steps, values, cache = forward_block(params, cache, blk, threshold, cfg, opts,
                                                        max_steps=opts.num_steps, criterion=criterion, has_past=False,
                                                        all_logits=False)
    last_state = jnp.take_along_axis(state, (prompt_len - 1)[:, None, None], axis=1)
    return logits[:, 0], last_state, steps, values, cache._replace(length=prompt_len)


# `mesh` is static only to key the compile cache: sharding comes from `activate` while tracing.
@functools.partial(jax.jit, static_argnames=("cfg", "opts", "T", "mesh"))
def _generate(params, prompt, prompt_len, stop_ids, rng, init_scale, threshold, sampling: Sampling,
              cfg: ModelConfig, opts: Options, T: int, mesh: Any = None):
    b = prompt.shape[0]
    n = opts.max_new_tokens
    logits, state, steps, values, cache = _prefill(params, prompt, prompt_len, rng, init_scale, threshold, cfg, opts, T)
    tok = sample_token(logits, jax.random.fold_in(rng, 1), sampling, opts.sample)
    tokens = jnp.full((b, n), -1, jnp.int32).at[:, 0].set(tok)
    step_out = jnp.zeros((b, n), jnp.int32).at[:, 0].set(steps)
    value_out = jnp.full((b, n, opts.num_steps), jnp.nan, jnp.float32).at[:, 0].set(values)
    done = jnp.isin(tok, stop_ids)

    def body(carry):
        i, tok, state, done, cache, tokens, step_out, value_out = carry
        key = jax.random.fold_in(rng, i + 1)
        k_init, k_sample = jax.random.split(key)
        init = state if opts.continuous else model.initial_state(k_init, (b, 1, cfg.n_embd), cfg, init_scale)
        blk = Block(tok[:, None], jnp.zeros((b,), jnp.int32), ~done, init)
        logits, new_state, steps, values, cache = forward_block(params, cache, blk, threshold, cfg, opts,
                                                        max_steps=opts.num_steps, criterion=opts.criterion,
                                                        has_past=True, all_logits=False)
        cache = cache._replace(length=cache.length + (~done))
        nxt = jnp.where(done, -1, sample_token(logits[:, 0], k_sample, sampling, opts.sample))
        tokens = tokens.at[:, i].set(nxt)
        step_out = step_out.at[:, i].set(jnp.where(done, 0, steps))
        value_out = value_out.at[:, i].set(values)
        return (i + 1, jnp.where(done, tok, nxt), new_state, done | jnp.isin(nxt, stop_ids), cache, tokens, step_out,
                value_out)

    carry = (jnp.int32(1), tok, state, done, cache, tokens, step_out, value_out)
    carry = jax.lax.while_loop(lambda c: (c[0] < n) & ~jnp.all(c[3]), body, carry)
    tokens, step_out, value_out = carry[5:]
    return tokens, step_out, jnp.sum(tokens >= 0, -1), jnp.int32(0), value_out


@functools.partial(jax.jit, static_argnames=("cfg", "opts", "T", "mesh"))
def _generate_speculative(params, prompt, prompt_len, stop_ids, rng, init_scale, threshold, sampling: Sampling,
                          verification_threshold, cfg: ModelConfig, opts: Options, T: int, mesh: Any = None):
    """Draft `lookahead` tokens at `draft_steps`, verify them in one block at `num_steps`, keep the agreeing prefix.

    The official `generate_speculative`: the verifier's argmax must equal the draft (or, with
    `verification_threshold` < 1, the draft's probability must be >= threshold x the top one); after the
    first disagreement the verifier's own token is taken. Rewinding is setting `length` back: entries
    beyond it (drafts, rejected tokens) are masked and later overwritten.
    """
    b = prompt.shape[0]
    n, A = opts.max_new_tokens, opts.lookahead
    logits, _, _, _, cache = _prefill(params, prompt, prompt_len, rng, init_scale, threshold, cfg, opts, T)
    pending = sample_token(logits, jax.random.fold_in(rng, 1), sampling, opts.sample)
    tokens = jnp.full((b, n + A), -1, jnp.int32).at[:, 0].set(pending)
    count = jnp.ones((b,), jnp.int32)
    done = jnp.isin(pending, stop_ids)
    rows = jnp.arange(b)[:, None]

    def body(carry):
        r, pending, count, done, cache, tokens = carry
        key = jax.random.fold_in(rng, r + 2)
        start = cache.length
        live = ~done & (count < n)

        def draft(j, carry):  # one drafted token per call, cached at draft depth (rewound below)
            cache, drafted = carry
            k_init, k_sample = jax.random.split(jax.random.fold_in(key, j + 2))
            blk = Block(drafted[:, j][:, None], jnp.zeros((b,), jnp.int32), live,
                        model.initial_state(k_init, (b, 1, cfg.n_embd), cfg, init_scale))
            logits, _, _, _, cache = forward_block(params, cache, blk, threshold, cfg, opts, max_steps=opts.draft_steps,
                                                criterion="none", has_past=True, all_logits=False)
            cache = cache._replace(length=cache.length + 1)
            return cache, drafted.at[:, j + 1].set(sample_token(logits[:, 0], k_sample, sampling, opts.sample))

        drafted = jnp.zeros((b, A + 1), jnp.int32).at[:, 0].set(pending)
        cache, drafted = jax.lax.fori_loop(0, A, draft, (cache, drafted))
        cache = cache._replace(length=start)
        k_init, k_sample = jax.random.split(jax.random.fold_in(key, 1))
        blk = Block(drafted[:, :A], jnp.full((b,), A - 1, jnp.int32), live,
                    model.initial_state(k_init, (b, A, cfg.n_embd), cfg, init_scale))
        logits, _, _, _, cache = forward_block(params, cache, blk, threshold, cfg, opts, max_steps=opts.num_steps,
                                               criterion="none", has_past=True, all_logits=True)
        proposals = drafted[:, 1:]
        probs = jax.nn.softmax(logits, -1)
        ok = jnp.where(verification_threshold >= 1, jnp.argmax(logits, -1) == proposals,
                       jnp.take_along_axis(probs, proposals[..., None], -1)[..., 0]
                       >= verification_threshold * probs.max(-1))
        agree = jnp.argmin(ok, -1).astype(jnp.int32)
        agree = jnp.where(jnp.all(ok, -1), A, agree)
        fix = sample_token(jnp.take_along_axis(logits, jnp.minimum(agree, A - 1)[:, None, None], 1)[:, 0],
                           k_sample, sampling, opts.sample)
        new = jnp.where(jnp.arange(A)[None] < agree[:, None], proposals, fix[:, None])
        accepted = jnp.minimum(agree + 1, A)
        is_stop = jnp.isin(new, stop_ids) & (jnp.arange(A)[None] < accepted[:, None])
        accepted = jnp.where(jnp.any(is_stop, -1), jnp.argmax(is_stop, -1) + 1, accepted)
        accepted = jnp.where(live, accepted, 0)
        idx = jnp.where(jnp.arange(A)[None] < accepted[:, None], count[:, None] + jnp.arange(A)[None], n + A)
        tokens = tokens.at[rows, idx].set(new, mode="drop")
        cache = cache._replace(length=start + accepted)
        pending = jnp.where(live,  jnp.take_along_axis(new, jnp.maximum(accepted - 1, 0)[:, None], 1)[:, 0], pending)
        return r + 1, pending, count + accepted, done | (live & jnp.any(is_stop, -1)), cache, tokens

    carry = (jnp.int32(0), pending, count, done, cache, tokens)
    carry = jax.lax.while_loop(lambda c: jnp.any(~c[3] & (c[2] < n)), body, carry)
    tokens = carry[5][:, :n]
    lengths = jnp.sum(tokens >= 0, -1)
    steps = jnp.where(tokens >= 0, opts.num_steps, 0)
    return tokens, steps, lengths, carry[0], None


# ---- memory --------------------------------------------------------------------------------------


def generation_bytes(cfg: ModelConfig, opts: Options, batch: int, prompt_len: int, T: int) -> int:
    """Estimated device bytes of one generation call besides the parameters: the KV cache (`cache_bytes`),
    the fresh core entries, attention scores, MLP activations and logits of the largest block (the
    prompt, or a verified draft), and the exit values kept per step. A lower bound of what XLA allocates,
    so a call it refuses cannot fit."""
    core = cache_slots(opts.strategy, opts.num_steps, cfg) * cfg.n_layers_in_recurrent_block
    L = max(prompt_len, opts.lookahead if opts.draft_steps else 1)
    fresh = core * L * _kv_bytes(cfg, batch)
    activations = batch * L * (cfg.n_heads * (T + L) + 3 * cfg.n_embd + 2 * cfg.intermediate_size) * 4
    logits = batch * (L if opts.draft_steps else 1) * cfg.vocab_size * 4
    values = 0 if opts.draft_steps else batch * opts.max_new_tokens * opts.num_steps * 4
    return cache_bytes(cfg, batch, T, opts.num_steps, opts.strategy) + fresh + activations + logits + values


def _host_available_bytes() -> int | None:
    """Host memory this process may still use: MemAvailable from /proc/meminfo (else free physical pages),
    capped by a cgroup v2 limit; None where none of these can be read."""
    free = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        free = int(line.split()[1]) * 1024
    if free is None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):  # memory.max is "max" when unlimited
        cgroup = Path("/sys/fs/cgroup")
        room = int((cgroup / "memory.max").read_text()) - int((cgroup / "memory.current").read_text())
        free = room if free is None else min(free, room)
    return free


def available_bytes(devices: Sequence[jax.Device]) -> int | None:
    """Bytes free for a generation on `devices`: the sum of what each accelerator reports free, or the host's
    available memory where devices report none (CPU: all share the host's); None when unknown (no check)."""
    stats = [d.memory_stats() or {} for d in devices]
    if all("bytes_limit" in st for st in stats):
        return sum(st["bytes_limit"] - st.get("bytes_in_use", 0) for st in stats)
    return _host_available_bytes()


def _largest(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in [1, high] with `fits(n)` (true up to some n, false after), or 0 if none."""
    low = 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def _check_memory(params: Params, cfg: ModelConfig, opts: Options, batch: int, prompt_len: int, T: int,
                  mesh: jax.sharding.Mesh | None) -> None:
    """Refuse, before compiling, a call whose estimated memory exceeds what its devices have free, naming
    the cache strategies and the largest num_steps that would fit. Parameters count where they will be
    copied (a mesh reshards them; host arrays are transferred); those on the device already are in use.
    Over several hosts, each checks its own devices for its share."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    local = [d for d in devices if d.process_index == jax.process_index()]
    free = available_bytes(local)
    if free is None:
        return
    leaves = [x for x in jax.tree.leaves(params) if mesh is not None or not isinstance(x, jax.Array)]
    copied = sum(x.size * np.dtype(x.dtype).itemsize for x in leaves)

    def need(**change: Any) -> int:
        total = copied + generation_bytes(cfg, dataclasses.replace(opts, **change), batch, prompt_len, T)
        return total * len(local) // len(devices)

    if need() <= free:
        return
    c = cfg.n_layers_in_recurrent_block
    fits = [s for s in STRATEGIES if "<" not in s and s != opts.strategy and need(strategy=s) <= free]
    slots = _largest(lambda k: need(strategy=f"compress-s{k * c}") <= free, opts.num_steps - 1)
    fits += [f"compress-s{c}" + (f" up to compress-s{slots * c}" if slots > 1 else "")] if slots else []
    steps = _largest(lambda n: need(num_steps=n) <= free, opts.num_steps - 1)
    ways = [f"cache_strategy {' or '.join(fits)}"] if fits else []
    ways += [f"num_steps <= {steps}"] if steps else []
    where = "the host" if local[0].platform == "cpu" else f"{len(local)} x {local[0].device_kind}"
    cache = cache_bytes(cfg, batch, T, opts.num_steps, opts.strategy)
    raise GenerateError(
        f"generation needs about {_gib(need())} (KV cache {_gib(cache)} with cache_strategy={opts.strategy!r} and "
        f"num_steps={opts.num_steps}) but {where} has {_gib(free)} free; "
        + (f"{' or '.join(ways)} would fit" if ways else "even one step does not fit: fewer prompts or max_new_tokens"),
        hint="the cache keeps one entry per (recurrence step, core layer); compress strategies share slots")


# ---- the public API ------------------------------------------------------------------------------


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 integer: bool = False) -> None:
    """`value` in [low, high] (or (low, high]), a finite real number (an integer when `integer`), else a
    named error. NaN and infinities are refused: they pass no comparison, or turn the sampler degenerate."""
    valid = f"{'(' if low_open else '['}{low}, {high}{')' if high == math.inf else ']'}"
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not (is_int or isinstance(value, (float, np.floating))):
        raise GenerateError(f"{name}={value!r} must be {'an integer' if integer else 'a number'} in {valid}")
    if not (is_int or math.isfinite(value)):
        raise GenerateError(f"{name}={value} is not a finite number; valid range is {valid}")
    if integer and not (is_int or float(value).is_integer()):
        raise GenerateError(f"{name}={value!r} must be an integer in {valid}")
    if not ((value > low if low_open else value >= low) and value <= high):
        raise GenerateError(f"{name}={value} is out of range; valid range is {valid}")


def _check_strategy(strategy: str, cfg: ModelConfig) -> None:
    if strategy.startswith("compress-s"):
        n = strategy.removeprefix("compress-s")
        c = cfg.n_layers_in_recurrent_block
        if not n.isdigit() or int(n) < c or int(n) % c:
            raise GenerateError(f"cache_strategy={strategy!r}: compress-s<n> counts core-layer entries; n must be a "
                                f"positive multiple of the core depth {c} (e.g. compress-s{c})")
    elif strategy not in STRATEGIES:
        raise GenerateError(f"unknown cache_strategy={strategy!r}; valid: {', '.join(STRATEGIES)}")


def _prompts(input_ids: Any, prompt_lengths: Any, max_new_tokens: int,
             cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded `[b, bucket]` ids and lengths `[b]` from an array (+ lengths) or a list of sequences."""
    if isinstance(input_ids, (list, tuple)) and input_ids and np.ndim(input_ids[0]) > 0:
        if prompt_lengths is not None:
            raise GenerateError("prompt_lengths is for a padded [batch, seq] array; a list of sequences has its own")
        rows = [np.asarray(r).reshape(-1) for r in input_ids]
        lengths = np.asarray([len(r) for r in rows], np.int32)
    else:
        arr = np.asarray(input_ids)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise GenerateError(f"input_ids must be [batch, seq] or a list of sequences, got shape {list(arr.shape)}")
        lengths = np.full((arr.shape[0],), arr.shape[1]) if prompt_lengths is None else np.asarray(prompt_lengths)
        if (lengths.shape != (arr.shape[0],) or not np.issubdtype(lengths.dtype, np.integer)
                or (lengths < 1).any() or (lengths > arr.shape[1]).any()):
            raise GenerateError(f"prompt_lengths={lengths.tolist()} must be {arr.shape[0]} integers in "
                                f"[1, {arr.shape[1]}] for input_ids of shape {list(arr.shape)}")
        lengths = lengths.astype(np.int32)
        rows = [arr[i, :n] for i, n in enumerate(lengths)]
    if not rows or (lengths == 0).any():
        raise GenerateError("empty prompt: every prompt needs at least one token (e.g. the tokenizer's bos)")
    for i, r in enumerate(rows):
        if not np.issubdtype(r.dtype, np.integer) or (r < 0).any() or (r >= cfg.vocab_size).any():
            raise GenerateError(f"prompt {i} has token ids outside [0, vocab_size={cfg.vocab_size})")
    if lengths.max() + max_new_tokens > cfg.block_size:
        raise GenerateError(f"prompt of {lengths.max()} tokens + max_new_tokens={max_new_tokens} exceeds the context "
                            f"block_size={cfg.block_size}; shorten the prompt or lower max_new_tokens")
    bucket = min(max(16, 1 << int(lengths.max() - 1).bit_length()), cfg.block_size - max_new_tokens)  # fewer compiles
    out = np.zeros((len(rows), bucket), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, lengths


def _check_batch_split(batch: int, mesh: jax.sharding.Mesh, rules: RulesConfig) -> None:
    """The prompts must split evenly over the mesh axes of the `batch` rule (the cache and activations do)."""
    ways = shards(rules, mesh, "batch")
    if batch % ways:
        raise GenerateError(f"{batch} prompt(s) do not split over the mesh axes {rules.batch} of the batch rule "
                            f"({ways} ways); pass a multiple of {ways} prompts",
                            hint="or replicate the batch on every device with mesh.rules.batch=null")


def generate(params: Params, input_ids: Any, config: ModelConfig | Config, *, max_new_tokens: int, num_steps: int,
             init_scale: float = 1.0, exit_criterion: str | None = None, exit_threshold: float | None = None,
             exit_in_prefill: bool = True, cache_strategy: str = "full", temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, stop_ids: Sequence[int] = (), continuous: bool = False,
             draft_steps: int | None = None, lookahead: int = 4, verification_threshold: float = 1.0,
             prompt_lengths: Any = None, rng: jax.Array | None = None,
             mesh: jax.sharding.Mesh | None = None, rules: RulesConfig | None = None) -> Generation:
    """Generate up to `max_new_tokens` per prompt with `num_steps` recurrences per token (the cap, with an exit).

    `input_ids`: `[batch, seq]` ids (with `prompt_lengths` when rows are right-padded) or a list of id
    sequences of different lengths. `temperature` 0 is greedy; otherwise sample with top-k (0 = off),
    top-p (1 = off), min-p (0 = off). `exit_criterion`: one of `CRITERIA` (threshold default: the
    official one); `cache_strategy`: one of `STRATEGIES` (with compress strategies, an entry a token never
    computed is skipped, where the official raises). `continuous`: warm-start each token's latent from
    the previous token's final one (the raw core output, as the official adaptive path; its
    `generate_minimal` carries the latent after ln_f). `draft_steps`: self-speculative decoding with
    `lookahead` drafted tokens per verification (with sampling, like the official, this does not
    preserve the sampling distribution). Generation stops per row at a token in `stop_ids`. `rng`
    (default `jax.random.key(0)`, so repeated calls agree) draws initial latents and samples. With
    `mesh`, parameters, cache and activations are sharded by `rules` (default `RulesConfig()`), as in training.
    """
    cfg = config.model if isinstance(config, Config) else config
    _check_range("num_steps", num_steps, 1, MAX_STEPS, integer=True)
    _check_range("max_new_tokens", max_new_tokens, 1, cfg.block_size - 1, integer=True)
    _check_range("init_scale", init_scale, 0.0, 1e6)
    if rng is not None and not (isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)):
        raise GenerateError(f"rng must be a key from jax.random.key(seed), got {type(rng).__name__}")
    criterion = exit_criterion or "none"
    if criterion not in CRITERIA:
        raise GenerateError(f"unknown exit_criterion={exit_criterion!r}; valid: {', '.join(CRITERIA)}")
    crit = CRITERIA[criterion]
    threshold = crit.default if exit_threshold is None else exit_threshold
    if exit_threshold is not None:
        if criterion == "none":
            raise GenerateError("exit_threshold was given without an exit_criterion")
        _check_range(f"exit_threshold for {criterion}", threshold, *crit.valid, low_open=True, integer=crit.counting)
    _check_strategy(cache_strategy, cfg)
    _check_range("temperature", temperature, 0.0, math.inf)
    _check_range("top_p", top_p, 0.0, 1.0, low_open=True)
    _check_range("min_p", min_p, 0.0, 1.0)
    _check_range("top_k", top_k, 0, cfg.vocab_size, integer=True)
    stop_ids = np.asarray(stop_ids, np.int64).reshape(-1)
    if ((stop_ids < 0) | (stop_ids >= cfg.vocab_size)).any():
        raise GenerateError(f"stop_ids {stop_ids.tolist()} must lie in [0, vocab_size={cfg.vocab_size})")
    if draft_steps is not None:
        _check_range("draft_steps", draft_steps, 1, num_steps, integer=True)
        _check_range("lookahead", lookahead, 1, cfg.block_size, integer=True)
        _check_range("verification_threshold", verification_threshold, 0.0, 1.0, low_open=True)
        if criterion != "none" or continuous:
            raise GenerateError("speculative decoding (draft_steps) does not combine with exit_criterion or continuous")
    prompt, lengths = _prompts(input_ids, prompt_lengths, max_new_tokens, cfg)
    speculative = draft_steps is not None
    opts = Options(num_steps=int(num_steps), max_new_tokens=int(max_new_tokens), criterion=criterion,
                   strategy=cache_strategy, sample=temperature > 0, continuous=continuous,
                   exit_in_prefill=exit_in_prefill, draft_steps=int(draft_steps or 0), lookahead=int(lookahead))
    T = prompt.shape[1] + max_new_tokens + (lookahead if speculative else 0)
    sampling = Sampling(jnp.float32(temperature or 1.0), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p))
    _check_memory(params, cfg, opts, len(prompt), prompt.shape[1], T, mesh)
    context = contextlib.nullcontext()
    if mesh is not None:
        rules = rules or RulesConfig()
        _check_batch_split(len(prompt), mesh, rules)
        params = jax.device_put(params, named(mesh, param_partition_specs(cfg, rules, mesh)))
        context = activate(mesh, rules)
    stops = np.full((-(-len(stop_ids) // 8) * 8,), -1, np.int32)  # padded: a few stop-list lengths, few compiles
    stops[:len(stop_ids)] = stop_ids
    args = (params, jnp.asarray(prompt), jnp.asarray(lengths), jnp.asarray(stops),
            jax.random.key(0) if rng is None else rng, jnp.float32(init_scale), jnp.float32(threshold), sampling)
    static = dict(cfg=cfg, opts=opts, T=T, mesh=None if mesh is None else (mesh, rules))  # a mesh is a new program
    try:
        with context:
            if speculative:
                out = _generate_speculative(*args, jnp.float32(verification_threshold), **static)
            else:
                out = _generate(*args, **static)
        tokens, steps, lens, passes, values = jax.device_get(out)
    except jax.errors.JaxRuntimeError as e:  # the estimate is a lower bound: XLA's temporaries may not fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise GenerateError(f"out of memory while generating: {str(e).splitlines()[0]}",
                            hint="lower num_steps, max_new_tokens or the number of prompts, or use a "
                                 "compress-s<n> or compress-anchor cache_strategy") from e
    return Generation(tokens, steps, lens, int(passes), values)


# ---- command line --------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, Params]:
    """(config, params) from an rdlm model checkpoint, a training run folder or an HF huginn directory.

    `overrides` (`model.dtype=bfloat16`, ...) may change how the model computes, not its shapes.
    """
    path = Path(path)
    if not path.is_dir():
        raise GenerateError(f"checkpoint {path} does not exist or is not a directory")
    if (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir():
        config, params = load_model(path)
    elif (path / CONFIG_FILE).is_file():
        config, params, _ = load_run(path)
    elif (path / "config.json").is_file():
        model_cfg, params = load_hf_checkpoint(path)
        config = Config(model=model_cfg)
    else:
        raise GenerateError(f"{path} holds no checkpoint: expected {CONFIG_FILE} + {PARAMS_DIR}/ (rdlm checkpoint), "
                            f"{CONFIG_FILE} + checkpoints/ (training run) or config.json + *.safetensors (HF)")
    if overrides:
        new = with_overrides(config, list(overrides))
        if jax.tree.map(lambda x: x.shape, abstract_params(new.model)) != jax.tree.map(lambda x: x.shape, params):
            raise GenerateError(f"overrides {list(overrides)} change parameter shapes; only settings such as "
                                "model.dtype can be overridden at generation time")
        config = new
    return config, params


def _as_flags(message: str, names: Iterable[str]) -> str:
    """An API error message in the command line's terms: each keyword in `names` (filled from the flag of the
    same name) is written as the flag, `top_p=inf` -> `--top-p=inf`."""
    return re.sub(rf"\b({'|'.join(names)})\b", lambda m: "--" + m[1].replace("_", "-"), message)


def _encode_prompts(tok: Tokenizer, texts: list[str], chat: bool, system: str | None) -> list[np.ndarray]:
    """Token ids of each `--prompt`; a text the tokenizer keeps nothing of is refused (bos alone is no prompt)."""
    prompts = []
    for i, text in enumerate(texts):
        if chat:
            messages = [{"role": "system", "content": system}] if system else []
            prompts.append(tok.encode_chat(messages + [{"role": "user", "content": text}]))
        else:
            prompts.append(tok.encode(text))
            if len(prompts[-1]) == 1:
                raise GenerateError(f"prompt {i} (--prompt {text!r}) encodes to no tokens with tokenizer "
                                    f"{tok.source}: its vocabulary has none of the text's characters")
    return prompts


@cli
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m rdlm.generate", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.dtype=bfloat16")
    parser.add_argument("--checkpoint", required=True, help="rdlm checkpoint, training run folder or HF directory")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--num-steps", type=int, default=32, help="recurrences per token (the cap, with an exit)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--exit-criterion", choices=list(CRITERIA), default=None)
    parser.add_argument("--exit-threshold", type=float, default=None, help="default: the official one per criterion")
    parser.add_argument("--cache-strategy", default="full", help=f"one of {', '.join(STRATEGIES)}")
    parser.add_argument("--continuous", action="store_true", help="warm-start each token from the previous latent")
    parser.add_argument("--init-scale", type=float, default=1.0, help="initial latent noise (0: zeros)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draft-steps", type=int, default=None, help="self-speculative decoding: draft depth")
    parser.add_argument("--lookahead", type=int, default=4, help="drafted tokens per verification")
    parser.add_argument("--verification-threshold", type=float, default=1.0)
    parser.add_argument("--chat", action="store_true", help="format the prompt with the tokenizer's chat template")
    parser.add_argument("--system", default=None, help="system message for --chat")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: from --checkpoint)")
    parser.add_argument("--sharded", action="store_true",
                        help="shard over all devices by the config's mesh.* and mesh.rules.* (overridable)")
    args = parser.parse_args(argv)
    empty = [i for i, text in enumerate(args.prompt) if not text.strip()]
    if empty:
        raise GenerateError(f"prompt {empty[0]} (--prompt {args.prompt[empty[0]]!r}) is empty; every prompt needs "
                            "some text (prompts count from 0 in the order given)")
    _check_range("--seed", args.seed, -2**63, 2**63 - 1, integer=True)  # what jax.random.key takes
    config, params = load_checkpoint(args.checkpoint, args.overrides)
    tok = load_tokenizer(args.checkpoint, path=args.tokenizer, model_vocab_size=config.model.vocab_size,
                         fallback=config.data.tokenizer or None)
    prompts = _encode_prompts(tok, args.prompt, args.chat, args.system)
    kwargs = dict(max_new_tokens=args.max_new_tokens, num_steps=args.num_steps, init_scale=args.init_scale,
                  exit_criterion=args.exit_criterion, exit_threshold=args.exit_threshold,
                  cache_strategy=args.cache_strategy, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, min_p=args.min_p, stop_ids=tok.stop_ids, continuous=args.continuous,
                  draft_steps=args.draft_steps, lookahead=args.lookahead,
                  verification_threshold=args.verification_threshold, rng=jax.random.key(args.seed))
    if args.sharded:
        kwargs |= dict(mesh=make_mesh(config.mesh), rules=config.mesh.rules)
    try:
        out = generate(params, prompts, config, **kwargs)
    except GenerateError as e:
        flags = kwargs.keys() & vars(args).keys()
        raise GenerateError(_as_flags(str(e), flags), hint=e.hint and _as_flags(e.hint, flags)) from e
    for i, text in enumerate(args.prompt):
        n = int(out.lengths[i])
        steps = out.steps[i, :n]
        print(f"--- prompt {i}: {text!r}\n{tok.decode(out.tokens[i, :n])}")
        print(f"[{n} tokens, {steps.mean():.2f} recurrence steps per token (min {steps.min()}, max {steps.max()})]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
