"""Next-token choice from fp32 logits: greedy, or the official filter order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Sampling:
    """Traced sampling settings (changing them does not recompile): scalars, or one per row `[b]`."""
    temperature: jax.Array  # 0 (per row): greedy
    top_k: jax.Array  # 0: off
    top_p: jax.Array  # 1: off
    min_p: jax.Array  # 0: off


def _column(x: jax.Array) -> jax.Array:
    return jnp.reshape(x, (-1, 1))


def sample_token(logits: jax.Array, key: jax.Array, s: Sampling, sample: bool) -> jax.Array:
    """Next ids [b] from fp32 logits [b, v]: argmax, or the official order temperature -> top-k -> top-p -> min-p.

    `key`: one key for the batch, or one per row `[b]` (a row's draw then depends on its key alone). With
    per-row settings, rows at temperature 0 take the argmax."""
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)
    if not sample:
        return greedy
    temperature = _column(s.temperature)
    probs = jax.nn.softmax(logits / jnp.where(temperature > 0, temperature, 1.0), -1)
    order = jnp.argsort(-probs, -1)
    sorted_probs = jnp.take_along_axis(probs, order, -1)
    top_k = _column(s.top_k)
    kth = jnp.take_along_axis(sorted_probs, jnp.broadcast_to(jnp.clip(top_k - 1, 0, probs.shape[-1] - 1),
                                                             (probs.shape[0], 1)), -1)
    probs = jnp.where((top_k > 0) & (probs < kth), 0.0, probs)
    sorted_probs = jnp.take_along_axis(probs, order, -1)
    top_p = _column(s.top_p)
    drop_sorted = (jnp.cumsum(sorted_probs, -1) > top_p).at[:, 0].set(False) & (top_p < 1)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(probs.shape[0])[:, None], order].set(drop_sorted)
    probs = jnp.where(drop, 0.0, probs)
    probs = jnp.where(probs < _column(s.min_p) * probs.max(-1, keepdims=True), 0.0, probs)
    if jnp.ndim(key) == 0:
        drawn = jax.random.categorical(key, jnp.log(probs), -1)
    else:
        drawn = jax.vmap(jax.random.categorical)(key, jnp.log(probs))
    return jnp.where(temperature[:, 0] > 0, drawn.astype(jnp.int32), greedy)
