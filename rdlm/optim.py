"""Optax optimizers of the official recipe: AdamW or the official ELLISAdam (which trained huginn-0125),
trapezoid (warmup-stable-decay) schedule, global-norm clipping, weight decay only on matrices and
embeddings (norms and biases exempt, from the parameter table)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rdlm.config import ModelConfig, OptimConfig, RulesConfig
from rdlm.params import decay_mask
from rdlm.sharding import named, param_partition_specs


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Official `trapezoid`: lr * s / warmup, then lr, then lr * (total - s) / cooldown, floored at min_lr
    (s counts optimizer steps from 1)."""
    def schedule(count):
        s = count + 1
        warm = cfg.lr * s / max(cfg.warmup_steps, 1)
        cool = cfg.lr * (total_steps - s) / max(cfg.cooldown_steps, 1)
        return jnp.maximum(jnp.minimum(jnp.minimum(warm, cool), cfg.lr), cfg.min_lr)
    return schedule


class ScaleByEllisAdamState(NamedTuple):
    """Steps taken and the two moments (shaped, typed and sharded like the parameters)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_ellis_adam(b1: float, b2: float, eps: float, *, atan2: bool = True, update_clipping: bool = True,
                        running_init: bool = True) -> optax.GradientTransformation:
    """The official ELLISAdam step direction, before weight decay and learning rate (a minus sign and lr_t
    follow in the chain): m and v are EMAs of g and g^2, and the update is

        atan2(m, sqrt(v) / sqrt(bc2)) / bc1        (atan2; else  m / (sqrt(v) / sqrt(bc2) + eps) / bc1)

    with the bias corrections bc = 1 - beta^t (applied with running_init too). running_init starts m, v at
    the first gradient instead of zeros. update_clipping clamps v at eps^2 (kept in the state, as the
    official in-place clamp) and divides each tensor's update by max(1, RMS(g / sqrt(v))). The other
    ELLISAdam options (nesterov, eps_adjustment, kahan_sum_compensation, buffer_dtype, tensor-wise checks,
    adafactor-like betas, brute_force_clip, poly_ema_p) are off, as in huginn-0125's run, and not offered."""
    def init(params: optax.Params) -> ScaleByEllisAdamState:
        return ScaleByEllisAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(jnp.zeros_like, params),
                                     nu=jax.tree.map(jnp.zeros_like, params))

    def first_moment(g: jax.Array, m: jax.Array, first: jax.Array) -> jax.Array:
        prev = jnp.where(first, g, m) if running_init else m
        return (prev + (1 - b1) * (g - prev)).astype(m.dtype)

    def second_moment(g: jax.Array, v: jax.Array, first: jax.Array) -> jax.Array:
        prev = jnp.where(first, g * g, v) if running_init else v
        new = b2 * prev + (1 - b2) * g * g
        return (jnp.maximum(new, eps**2) if update_clipping else new).astype(v.dtype)

    def direction(g: jax.Array, m: jax.Array, v: jax.Array, bc1: jax.Array, bc2: jax.Array) -> jax.Array:
        denom = jnp.sqrt(v) / jnp.sqrt(bc2)
        u = jnp.arctan2(m, denom) if atan2 else m / (denom + eps)
        if update_clipping:
            u = u / jnp.maximum(jnp.sqrt(jnp.mean(g * g / v)), 1.0)
        return (u / bc1).astype(g.dtype)

    def update(updates: optax.Updates, state: ScaleByEllisAdamState, params: optax.Params | None = None):
        del params
        count = optax.safe_increment(state.count)
        first = state.count == 0
        mu = jax.tree.map(lambda g, m: first_moment(g, m, first), updates, state.mu)
        nu = jax.tree.map(lambda g, v: second_moment(g, v, first), updates, state.nu)
        bc1, bc2 = 1 - b1**count, 1 - b2**count
        updates = jax.tree.map(lambda g, m, v: direction(g, m, v, bc1, bc2), updates, mu, nu)
        return updates, ScaleByEllisAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def scale_by_moments(cfg: OptimConfig) -> optax.GradientTransformation:
    """The step direction of optimizer `cfg.name`, before weight decay and learning rate."""
    eps = cfg.setting("eps")
    if cfg.name == "ellis-adam":
        return scale_by_ellis_adam(cfg.b1, cfg.b2, eps, atan2=cfg.setting("atan2"),
                                   update_clipping=cfg.setting("update_clipping"),
                                   running_init=cfg.setting("running_init"))
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=eps)


def optimizer_chain(cfg: OptimConfig, mask: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """clip -> moments -> weight decay where `mask` is True -> scheduled learning rate. Both optimizers
    decay as the official: weights times 1 - weight_decay * lr_t / lr when decoupled, else 1 - lr_t *
    weight_decay, applied with the update (the official decays first, then adds the step)."""
    decay = cfg.weight_decay / cfg.lr if cfg.decoupled_weight_decay else cfg.weight_decay
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        scale_by_moments(cfg),
        optax.add_decayed_weights(decay, mask=mask),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(cfg: OptimConfig, model_cfg: ModelConfig, total_steps: int) -> optax.GradientTransformation:
    """The training optimizer of a model: `optimizer_chain` with its decay mask and the trapezoid schedule."""
    return optimizer_chain(cfg, decay_mask(model_cfg), lr_schedule(cfg, total_steps))


def state_shardings(state: Any, optimizer: optax.GradientTransformation, model_cfg: ModelConfig, rules: RulesConfig,
                    mesh: Mesh) -> Any:
    """Shardings of a train state {params, opt_state, step, rng}: optimizer moments follow their parameter,
    counters and keys are replicated."""
    params = named(mesh, param_partition_specs(model_cfg, rules, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(optimizer, lambda _, s: s, state["opt_state"], params,
                                transform_non_params=lambda _: replicated)
    return {"params": params, "opt_state": opt, "step": replicated, "rng": replicated}
