"""Next-token choice from fp32 logits: greedy, or the official filter order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Sampling:
    """Traced sampling settings (changing them does not recompile)."""
    temperature: jax.Array
    top_k: jax.Array  # 0: off
    top_p: jax.Array  # 1: off
    min_p: jax.Array  # 0: off


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
