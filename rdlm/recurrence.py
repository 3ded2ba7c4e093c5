"""Sampled recurrence depth for training: the official `randomized_iteration_sampler` schemes.

Each training step runs n recurrences without gradient, then k with. A scheme (`train.recurrence`, the
official `sampling_scheme`) draws (n, k) around t = max(mean_recurrence - mean_backprop_depth, 0) and
s = mean_backprop_depth; `<scheme>-curriculum-N` ramps t and s up linearly over the first N steps.
Sampling is a jittable function of a key and a (traced) step, so no depth recompiles the train step.
"""

from __future__ import annotations

import warnings
from typing import Callable

import jax
import jax.numpy as jnp

from rdlm.config import ModelConfig, check_recurrence

Sampler = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
SIGMA = 0.5  # spread of the official log-normal Poisson rate


def _uniform(key: jax.Array, low: jax.Array | int, high: jax.Array | int) -> jax.Array:
    """An integer uniform in low..high, both included."""
    return jax.random.randint(key, (), low, high + 1)


def _lognormal_poisson(key: jax.Array, mean: jax.Array) -> jax.Array:
    """Poisson(rate) with rate ~ LogNormal(log(mean) - SIGMA^2 / 2, SIGMA): mean `mean`, heavier tail."""
    k_rate, k_poisson = jax.random.split(key)
    rate = jnp.exp(jnp.log(mean) - SIGMA**2 / 2 + SIGMA * jax.random.normal(k_rate))
    return jax.random.poisson(k_poisson, rate)


def _poisson_lognormal_filling(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """huginn-0125: p = LogNormal-Poisson(t + s) + 1 in all; the last min(s, p) with gradient."""
    p = _lognormal_poisson(key, t + s) + 1
    return jnp.maximum(p - s, 0), jnp.minimum(s, p)


def _poisson_lognormal(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n ~ LogNormal-Poisson(t), k uniform in 1..2s."""
    k_n, k_k = jax.random.split(key)
    return _lognormal_poisson(k_n, t), _uniform(k_k, 1, 2 * s)


def _poisson_lognormal_fill(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n ~ LogNormal-Poisson(t), k = s."""
    return _lognormal_poisson(key, t), s


def _poisson_fill(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n ~ Poisson(t), k = s."""
    return jax.random.poisson(key, t), s


def _poisson_unbounded(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n ~ Poisson(t), k uniform in 1..2s."""
    k_n, k_k = jax.random.split(key)
    return jax.random.poisson(k_n, t), _uniform(k_k, 1, 2 * s)


def _poisson_bounded(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n = min(Poisson(t), 2t - 1), k uniform in 1..2s."""
    k_n, k_k = jax.random.split(key)
    return jnp.minimum(jax.random.poisson(k_n, t), 2 * t - 1), _uniform(k_k, 1, 2 * s)


def _negative_binomial(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n ~ Poisson(Gamma(t, 1)) (negative binomial: mean t, variance 2t), k uniform in 1..2s."""
    k_rate, k_n, k_k = jax.random.split(key, 3)
    return jax.random.poisson(k_n, jax.random.gamma(k_rate, t.astype(jnp.float32))), _uniform(k_k, 1, 2 * s)


def _simple(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n uniform in 0..2t-1, k uniform in 1..2s (n + k trapezoidal)."""
    k_n, k_k = jax.random.split(key)
    return _uniform(k_n, 0, 2 * t - 1), _uniform(k_k, 1, 2 * s)


def _non_uniform(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """m uniform in 0..2t-1, k uniform in 1..2 min(t, s), n = max(m - k, 0) (n + k about uniform)."""
    k_n, k_k = jax.random.split(key)
    k = _uniform(k_k, 1, 2 * jnp.minimum(t, s))
    return jnp.maximum(_uniform(k_n, 0, 2 * t - 1) - k, 0), k


def _bptt(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n uniform in 0..2t-1, k uniform in 1..min(2t - n, 2s) (n + k skewed toward 2t)."""
    k_n, k_k = jax.random.split(key)
    n = _uniform(k_n, 0, 2 * t - 1)
    return n, _uniform(k_k, 1, jnp.minimum(2 * t - n, 2 * s))


def _geometric(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n ~ Geometric(1/t) on 1, 2, ... (mean t), k uniform in 1..2s."""
    k_n, k_k = jax.random.split(key)
    return jax.random.geometric(k_n, 1 / t, dtype=jnp.int32), _uniform(k_k, 1, 2 * s)


def _fixed(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n = t, k = s."""
    return t, s


def _full(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n = 0, k uniform in 1..2s."""
    return jnp.int32(0), _uniform(key, 1, 2 * s)


def _non_recurrent(key: jax.Array, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n = 0, k = 1."""
    return jnp.int32(0), jnp.int32(1)


SAMPLERS: dict[str, Sampler] = {
    "poisson-lognormal-filling": _poisson_lognormal_filling, "poisson-lognormal": _poisson_lognormal,
    "poisson-lognormal-fill": _poisson_lognormal_fill, "poisson-fill": _poisson_fill,
    "poisson-unbounded": _poisson_unbounded, "poisson-bounded": _poisson_bounded,
    "negative-binomial": _negative_binomial, "simple": _simple, "non-uniform": _non_uniform, "bptt": _bptt,
    "geometric": _geometric, "fixed": _fixed, "full": _full, "non-recurrent": _non_recurrent,
}


def _ramped(total: int, step: jax.Array | int, ramp: int) -> jax.Array:
    """ceil(total * min((step + 1) / ramp, 1)), exactly, in integers. The official ramp reads a step
    counter that is 1 on the first step; `step` counts the steps done before this one (0 first)."""
    done = jnp.clip(jnp.asarray(step, jnp.int32) + 1, 1, ramp)
    return (done * total + ramp - 1) // ramp


def sample_recurrence(key: jax.Array, cfg: ModelConfig, scheme: str = "poisson-lognormal-filling",
                      step: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """(n, k) int32: recurrences without and with gradient for training step `step` (0 first), drawn
    from `key` by `scheme` (`train.recurrence`); jittable with a traced step and vmappable over keys."""
    base, ramp = check_recurrence(scheme, cfg)
    if scheme == "poisson-lognormal":
        warnings.warn("train.recurrence=poisson-lognormal now samples the official `poisson-lognormal` "
                      "(n ~ Poisson with a log-normal rate around mean_recurrence - mean_backprop_depth, k uniform "
                      "in 1..2*mean_backprop_depth); rdlm's earlier poisson-lognormal, huginn-0125's sampling "
                      "scheme, is now named poisson-lognormal-filling (the default)", FutureWarning, stacklevel=2)
    t = max(cfg.mean_recurrence - cfg.mean_backprop_depth, 0)
    s = cfg.mean_backprop_depth
    if ramp is None:
        t, s = jnp.int32(t), jnp.int32(s)
    else:
        t, s = _ramped(t, step, ramp), jnp.maximum(_ramped(s, step, ramp), 1)
    n, k = SAMPLERS[base](key, t, s)
    return jnp.asarray(n, jnp.int32), jnp.asarray(k, jnp.int32)
