"""The KV cache of recurrent-depth generation and how tokens at one depth read entries of another.

One entry per (recurrence step, core layer) plus one per prelude and coda layer, as the official
model keeps. All shapes are static, so a whole generation is one compiled program. A token that exited
after k recurrences leaves no core entries for steps >= k; a cache strategy (`STRATEGIES`, the
official lookup strategies) says what later tokens attend to instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from rdlm import model
from rdlm.attention import causal_attention, softmax_init, softmax_result, softmax_update
from rdlm.config import ModelConfig
from rdlm.sharding import constrain

# How a token at recurrence step t finds keys/values of an earlier token that ran `steps` recurrences
# (entries exist for steps 0..steps-1). "full" and "skip" attend only to entries that exist (the
# official dynamic cache does the same for "full"); the m4 strategies substitute the same core layer
# at another step (official names: huginn's core has 4 layers, here it is any core depth).
STRATEGIES = ("full", "skip", "latest-m4", "available-m4", "always-last-m4", "compress-s<n>", "compress-anchor")
ANCHOR_STEPS = 8  # compress-anchor keeps the first 8 recurrences, then shares one slot (official)
DECODE_BLOCK = 256  # cached positions a new token reads at a time
KV_AXES = ("batch", "length", None, "heads", "head_dim")  # logical axes of one layer's cache


@struct.dataclass
class KVCache:
    """Static-shape cache. kv tensors are `[..., batch, length, 2 (k, v), heads, head_dim]`."""
    prelude: jax.Array  # [n_prelude, b, T, 2, h, d]
    core: jax.Array  # [slots, n_core, b, T, 2, h, d]
    coda: jax.Array  # [n_coda, b, T, 2, h, d]
    steps: jax.Array  # [b, T] recurrences each cached position ran
    length: jax.Array  # [b] positions filled per row


CACHE_AXES = KVCache(prelude=(None, *KV_AXES), core=(None, None, *KV_AXES), coda=(None, *KV_AXES),
                     steps=("batch", "length"), length=("batch",))


def cache_slots(strategy: str, num_steps: int, cfg: ModelConfig) -> int:
    """Recurrence slots of the core cache: one per step unless a compress strategy shares them."""
    if strategy.startswith("compress-s"):
        n = int(strategy.removeprefix("compress-s"))  # counted in core-layer entries, as the official
        return min(n // cfg.n_layers_in_recurrent_block, num_steps)
    if strategy == "compress-anchor":
        return min(num_steps, ANCHOR_STEPS + 1)
    return num_steps


def cache_layout(cfg: ModelConfig, batch: int, length: int, slots: int) -> KVCache:
    """Shape and dtype of every cache field (`jax.ShapeDtypeStruct`s): what `init_cache` allocates."""
    kv = (batch, length, 2, cfg.n_heads, cfg.head_dim)
    dt = jnp.dtype(cfg.dtype)
    return KVCache(prelude=jax.ShapeDtypeStruct((cfg.n_layers_in_prelude, *kv), dt),
                   core=jax.ShapeDtypeStruct((slots, cfg.n_layers_in_recurrent_block, *kv), dt),
                   coda=jax.ShapeDtypeStruct((cfg.n_layers_in_coda, *kv), dt),
                   steps=jax.ShapeDtypeStruct((batch, length), jnp.int32),
                   length=jax.ShapeDtypeStruct((batch,), jnp.int32))


def nbytes(tree: KVCache) -> int:
    """Bytes of a cache or of its layout."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def init_cache(cfg: ModelConfig, batch: int, length: int, slots: int) -> KVCache:
    """Zeros, sharded by the active mesh rules (batch over data, heads over tensor by default)."""
    layout = cache_layout(cfg, batch, length, slots)
    return KVCache(**{f.name: constrain(jnp.zeros(getattr(layout, f.name).shape, getattr(layout, f.name).dtype),
                                        getattr(CACHE_AXES, f.name)) for f in dataclasses.fields(KVCache)})


def cache_bytes(cfg: ModelConfig, batch: int, length: int, num_steps: int, strategy: str) -> int:
    """Bytes `init_cache` allocates for this strategy (what `tools/bench.py decode` reports), without tracing it."""
    return nbytes(cache_layout(cfg, batch, length, cache_slots(strategy, num_steps, cfg)))


def write_slot(strategy: str, t: jax.Array, slots: int) -> jax.Array:
    """The core slot recurrence step t writes."""
    if strategy.startswith("compress-s"):
        return t % slots
    return jnp.minimum(t, slots - 1)  # = t except for compress-anchor


def core_lookup(strategy: str, t: jax.Array, steps: jax.Array, past: jax.Array,
                slots: int) -> tuple[jax.Array, jax.Array]:
    """(slot to read: scalar or per position [b, T], entry exists [b, T]) for past positions at step t.

    `steps [b, T]` is meaningful only where `past` (positions below the row's length)."""
    if strategy in ("latest-m4", "available-m4"):  # the newest entry at or before step t
        return jnp.minimum(t, steps - 1), steps > 0
    if strategy == "always-last-m4":  # the position's deepest entry, once any past position lacks step t
        missing = jnp.any(past & (steps <= t), axis=1, keepdims=True)
        return jnp.where(missing, steps - 1, t), steps > 0
    slot = write_slot(strategy, t, slots)
    return slot, steps > slot


# What a layer reads of its cache: `read(i, start, size)` -> layer i's entries at positions
# start..start+size-1, `[b, size, 2, h, d]`.
CacheReader = Callable[[int, jax.Array, int], jax.Array]


def _attend_cached(q: jax.Array, k: jax.Array, v: jax.Array, new_mask: jax.Array, past: Callable[[jax.Array, int], jax.Array],
                   past_mask: jax.Array, filled: jax.Array, block: int) -> jax.Array:
    """One online softmax over the new tokens and the cached positions below `filled`, read `block` at a
    time (a `fori_loop` to the last filled block: never the empty rest of the static-length cache)."""
    b, L, n, d = q.shape
    T = past_mask.shape[1]
    C = min(block, T)

    def read(j, carry):
        start = jnp.minimum(j * C, T - C)  # a last block past T overlaps the one before: mask its repeats
        kv = past(start, C)
        pos = start + jnp.arange(C)
        mask = jax.lax.dynamic_slice_in_dim(past_mask, start, C, axis=1) & (pos >= j * C)
        return softmax_update(carry, q, kv[:, :, 0], kv[:, :, 1], mask[:, None, None, :])

    carry = softmax_update(softmax_init(b, L, n, d), q, k, v, new_mask)
    return softmax_result(jax.lax.fori_loop(0, -(-filled // C), read, carry), v.dtype)


def cached_mixer(rope: tuple[jax.Array, jax.Array], positions: jax.Array, new_mask: jax.Array,
                 read: CacheReader | None, past_mask: jax.Array, filled: jax.Array, implementation: str,
                 block: int = DECODE_BLOCK) -> model.Mixer:
    """The token mixer of cached layers: attention of the new tokens over (layer i's valid cached positions,
    read from the cache by `read` up to `filled`, the longest row's length; the new tokens themselves).
    With no cache to read (`read` is None: prefill), the new tokens' causal self-attention by
    `implementation` (`model.attention`). Its aux output is the new tokens' keys and values
    `[b, L, 2, h, d]`, for the caller to write."""
    def mix(i, attn, h):
        q, k, v = attn.qkv(h, rope)
        if read is None:
            y = causal_attention(q, k, v, positions, None, implementation)
        else:
            y = _attend_cached(q, k, v, new_mask, functools.partial(read, i), past_mask, filled, block)
        return attn.out(y), jnp.stack([k, v], axis=2)
    return mix
