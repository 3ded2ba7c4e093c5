"""Optax optimizer of the official recipe: AdamW, trapezoid (warmup-stable-decay) schedule, global-norm
clipping, weight decay only on matrices and embeddings (norms and biases exempt, from the parameter
table)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from rdlm.config import ModelConfig, OptimConfig
from rdlm.params import decay_mask


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
