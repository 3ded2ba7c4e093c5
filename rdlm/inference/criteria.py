"""Exit criteria: after every recurrence, each row of a batch decides on its own whether its token is done.

The official ones (`raven_modeling_minimal.py`, adaptive compute), with their "auto" thresholds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Criterion:
    """An exit test run after every recurrence: `value(carry, latents, logits, valid) -> (carry, value [b])`.

    A token exits when its value drops below the threshold, or, for a `counting` criterion, reaches it.
    `latents [b, s, e]` are the new tokens' states, `logits [b, v]` those of each row's last token (only
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
