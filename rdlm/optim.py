"""Optax optimizer of the official recipe: AdamW, trapezoid (warmup-stable-decay) schedule, global-norm
clipping, weight decay only on matrices and embeddings (norms and biases exempt, from the parameter
table)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from typing import Any

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


def make_optimizer(cfg: OptimConfig, model_cfg: ModelConfig, total_steps: int) -> optax.GradientTransformation:
    """clip -> Adam moments -> (masked) weight decay -> scheduled learning rate."""
    decay = cfg.weight_decay / cfg.lr if cfg.decoupled_weight_decay else cfg.weight_decay
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(decay, mask=decay_mask(model_cfg)),
        optax.scale_by_learning_rate(lr_schedule(cfg, total_steps)),
    )


def state_shardings(state: Any, optimizer: optax.GradientTransformation, model_cfg: ModelConfig, rules: RulesConfig,
                    mesh: Mesh) -> Any:
    """Shardings of a train state {params, opt_state, step, rng}: optimizer moments follow their parameter,
    counters and keys are replicated."""
    params = named(mesh, param_partition_specs(model_cfg, rules, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(optimizer, lambda _, s: s, state["opt_state"], params,
                                transform_non_params=lambda _: replicated)
    return {"params": params, "opt_state": opt, "step": replicated, "rng": replicated}
