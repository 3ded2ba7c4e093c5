"""Huginn, the recurrent-depth transformer, as pure functions over a plain parameter pytree.

Read top to bottom:  tokens -> embedding (x sqrt(n_embd)) -> prelude -> e
                      s_0 ~ truncated normal (or given)
                      s_i = core(adapter([s_{i-1}, e]))   for i = 1 .. num_steps   (lax.fori_loop)
                      ln_f(s_r) -> coda -> ln_f -> tied lm head -> logits
Every block is a SandwichBlock (a norm before and after both attention and MLP). The parameter
layout and official names are in `rdlm.params`; numerics follow the official
`raven_modeling_minimal.py` (RMSNorm in fp32, RoPE on interleaved pairs in fp32, qk bias before RoPE).
`num_steps` is a traced value: one compiled function serves every recurrence depth.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rdlm.config import ModelConfig
from rdlm.sharding import constrain

Params = dict[str, Any]


# ---- layers ---------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Normalise in fp32, cast back, then scale (the official `RMSNorm_llama`)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * scale.astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[batch, seq, 1, head_dim/2]` in fp32 for integer positions `[batch, seq]`."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate dimension pairs (2i, 2i+1) of `x [batch, seq, heads, head_dim]`, in fp32."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def project_qkv(p: Params, x: jax.Array, rope: tuple[jax.Array, jax.Array],
                cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys, values `[batch, seq, heads, head_dim]`: fused projection, qk bias, then RoPE."""
    qkv = jnp.einsum("bse,ecnd->bscnd", x, p["wqkv"].astype(x.dtype))
    if cfg.qk_bias:
        qkv = qkv.at[:, :, :2].add(p["qk_bias"].astype(x.dtype))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return apply_rope(q, *rope), apply_rope(k, *rope), v


def attention_scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled fp32 scores `[b,n,q,k]` of `q [b,q,n,d]` against `k [b,k,n,d]`, masked out where not `mask`."""
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
    return jnp.where(mask, scores, jnp.finfo(jnp.float32).min)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention of `q [b,q,n,d]` over `k, v [b,k,n,d]` where `mask [b,1,q,k]`."""
    probs = jax.nn.softmax(attention_scores(q, k, mask), axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", probs, v)


def attention_out(p: Params, y: jax.Array) -> jax.Array:
    """Heads `[b,s,n,d]` back to the residual stream."""
    return jnp.einsum("bqnd,nde->bqe", y, p["proj"].astype(y.dtype))


def attention(p: Params, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array,
              cfg: ModelConfig) -> jax.Array:
    """Causal multi-head self-attention."""
    return attention_out(p, attend(*project_qkv(p, x, rope, cfg), mask))


def gated_mlp(p: Params, x: jax.Array) -> jax.Array:
    """SiLU-gated MLP with a fused `fc` (gate, up)."""
    h = jnp.einsum("bse,egi->bsgi", x, p["fc"].astype(x.dtype))
    return jnp.einsum("bsi,ie->bse", jax.nn.silu(h[:, :, 0]) * h[:, :, 1], p["proj"].astype(x.dtype))


def sandwich(p: Params, x: jax.Array, mix: Callable[[Params, jax.Array], tuple[jax.Array, Any]],
             cfg: ModelConfig) -> tuple[jax.Array, Any]:
    """The SandwichBlock around a token mixer: `mix(attn params, normed x) -> (output, aux)`; returns (x, aux).

    The mixer is plain attention in training and cached attention in generation (`rdlm.generate`).
    """
    eps = cfg.norm_eps
    y, aux = mix(p["attn"], rms_norm(x, p["norm_1"]["scale"], eps))
    x = rms_norm(y + x, p["norm_2"]["scale"], eps)
    return rms_norm(gated_mlp(p["mlp"], rms_norm(x, p["norm_3"]["scale"], eps)) + x, p["norm_4"]["scale"], eps), aux


def sandwich_block(p: Params, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array,
                   cfg: ModelConfig) -> jax.Array:
    return sandwich(p, x, lambda pa, h: (attention(pa, h, rope, mask, cfg), None), cfg)[0]


HIDDEN = ("batch", "length", "activation_embed")  # logical axes of the residual stream


def run_blocks(blocks: list[Params], x: jax.Array, rope, mask, cfg: ModelConfig, remat: bool = False) -> jax.Array:
    """The blocks in order; with `remat`, each block's activations are recomputed in the backward pass."""
    block = jax.checkpoint(sandwich_block, static_argnums=(4,)) if remat else sandwich_block
    for p in blocks:
        x = constrain(block(p, x, rope, mask, cfg), HIDDEN)
    return x


# ---- the recurrent-depth model -------------------------------------------------------------------


def attention_mask(positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """`[batch, 1, q, k]`: causal by position, and within one packed segment when ids are given."""
    mask = positions[:, :, None] >= positions[:, None, :]
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return mask[:, None]


def embed(params: Params, input_ids: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Token embedding times sqrt(n_embd), in the compute dtype."""
    return params["wte"]["embedding"][input_ids].astype(cfg.dtype) * jnp.asarray(cfg.embed_scale, cfg.dtype)


def initial_state(rng: jax.Array, shape: tuple[int, ...], cfg: ModelConfig, init_scale: jax.Array) -> jax.Array:
    """The official 'like-init' latent: truncated normal (+-3 std), std = init_std * init_scale, times embed scale."""
    std = cfg.init_std * init_scale
    noise = jax.random.truncated_normal(rng, -3.0, 3.0, shape, jnp.float32)
    return (noise * std * cfg.embed_scale).astype(cfg.dtype)


def adapter(params: Params, state: jax.Array, embedded: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The input injection: a linear map of concat([state, embedded input])."""
    x = jnp.concatenate([state, embedded], axis=-1)
    x = x @ params["adapter"]["kernel"].astype(x.dtype)
    return x + params["adapter"]["bias"].astype(x.dtype) if cfg.bias else x


def core_step(params: Params, state: jax.Array, embedded: jax.Array, rope, mask, cfg: ModelConfig) -> jax.Array:
    """One recurrence: the adapter, then the core block's layers."""
    return run_blocks(params["core"], adapter(params, state, embedded, cfg), rope, mask, cfg)


def lm_head(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Coda output -> fp32 logits: ln_f, then the tied embedding (or an own head)."""
    x = rms_norm(x, params["ln_f"]["scale"], cfg.norm_eps)
    if cfg.tie_embeddings:
        return jnp.einsum("bse,ve->bsv", x, params["wte"]["embedding"].astype(x.dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("bse,ev->bsv", x, params["lm_head"]["kernel"].astype(x.dtype), preferred_element_type=jnp.float32)


def decode(params: Params, state: jax.Array, rope, mask, cfg: ModelConfig,
           remat: bool = False) -> tuple[jax.Array, jax.Array]:
    """Final latent -> (fp32 logits, normed latent): ln_f, coda, then the head."""
    latent = rms_norm(state, params["ln_f"]["scale"], cfg.norm_eps)
    return lm_head(params, run_blocks(params["coda"], latent, rope, mask, cfg, remat), cfg), latent


@functools.partial(jax.jit, static_argnames=("cfg",))
def apply(params: Params, input_ids: jax.Array, num_steps: jax.Array, init_state: jax.Array | None,
          init_scale: jax.Array, rng: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
          cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """The jitted forward with every argument explicit: (fp32 logits, final latent after ln_f)."""
    rope = rope_angles(positions, cfg.head_dim, cfg.rope_base)
    mask = attention_mask(positions, segment_ids)
    embedded = run_blocks(params["prelude"], embed(params, input_ids, cfg), rope, mask, cfg)
    if init_state is None:
        init_state = initial_state(rng, embedded.shape, cfg, init_scale)
    state = jax.lax.fori_loop(0, num_steps, lambda _, s: core_step(params, s, embedded, rope, mask, cfg),
                              init_state.astype(cfg.dtype))
    return decode(params, state, rope, mask, cfg)


def forward(params: Params, input_ids: jax.Array, config: ModelConfig, *, num_steps: int | jax.Array,
            init_state: jax.Array | None = None, init_scale: float = 1.0, rng: jax.Array | None = None,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            return_latents: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Logits `[batch, seq, vocab_size]` in fp32 after `num_steps` recurrences of the core block.

    The initial latent is `init_state` when given, else the official random init scaled by
    `init_scale` (0 gives zeros) drawn from `rng` (default: key 0, so calls are reproducible).
    `positions`/`segment_ids` `[batch, seq]` serve packed sequences (default: 0..seq-1, one segment).
    With `return_latents`, also returns the final latent state after `ln_f`, as the official does.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be an integer array [batch, seq], got {input_ids.dtype}{list(input_ids.shape)}")
    batch, seq = input_ids.shape
    if not 1 <= seq <= config.block_size:
        raise ValueError(f"input_ids has {seq} positions; valid range is 1..block_size={config.block_size}")
    if isinstance(num_steps, (int, np.integer)) and num_steps < 0:
        raise ValueError(f"num_steps={num_steps} must be >= 0")
    expected = (batch, seq, config.n_embd)
    if init_state is not None and tuple(init_state.shape) != expected:
        raise ValueError(f"init_state has shape {tuple(init_state.shape)}, expected {expected} [batch, seq, n_embd]")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    rng = jax.random.key(0) if rng is None else rng
    logits, latents = apply(params, input_ids, jnp.asarray(num_steps, jnp.int32), init_state,
                               jnp.asarray(init_scale, jnp.float32), rng, positions, segment_ids, config)
    return (logits, latents) if return_latents else logits


# ---- training: sampled depth and truncated backpropagation ---------------------------------------


def sample_recurrence(key: jax.Array, cfg: ModelConfig, scheme: str = "poisson-lognormal") -> tuple[jax.Array, jax.Array]:
    """(n, k): recurrences without and with gradient for one training step.

    The official `randomized_iteration_sampler`: a log-normal Poisson rate with mean
    `mean_recurrence` (sigma 0.5), p = Poisson(rate) + 1, n = max(p - s, 0), k = min(s, p) with
    s = mean_backprop_depth. `fixed`: always mean_recurrence steps, the last s of them with gradient.
    """
    s = cfg.mean_backprop_depth
    if scheme == "fixed":
        return jnp.int32(max(cfg.mean_recurrence - s, 0)), jnp.int32(min(s, cfg.mean_recurrence))
    t = max(cfg.mean_recurrence - s, 0)
    sigma = 0.5
    mu = np.log(t + s) - sigma**2 / 2
    k_rate, k_poisson = jax.random.split(key)
    rate = jnp.exp(mu + sigma * jax.random.normal(k_rate))
    p = jax.random.poisson(k_poisson, rate) + 1
    return jnp.maximum(p - s, 0).astype(jnp.int32), jnp.minimum(s, p).astype(jnp.int32)


def forward_train(params: Params, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                  n: jax.Array, k: jax.Array, rng: jax.Array, cfg: ModelConfig) -> jax.Array:
    """fp32 logits after n recurrences without gradient and k with it (k <= mean_backprop_depth).

    The n steps run in a `fori_loop` on stop-gradient inputs (n is traced: no recompiles, no
    activations kept). The k steps run in a `scan` of static length mean_backprop_depth, each under
    `jax.checkpoint` and skipped (`cond`) past k: activation memory is one latent per step (prelude and
    coda blocks are rematerialised too). Gradients
    reach the prelude through the embedded input injected at each of the k steps, as in the official.
    """
    rope = rope_angles(positions, cfg.head_dim, cfg.rope_base)
    mask = attention_mask(positions, segment_ids)
    embedded = run_blocks(params["prelude"], embed(params, input_ids, cfg), rope, mask, cfg, remat=True)
    state = initial_state(rng, embedded.shape, cfg, jnp.float32(1.0))
    frozen, frozen_embedded = jax.lax.stop_gradient((params, embedded))
    state = jax.lax.fori_loop(0, n, lambda _, s: core_step(frozen, s, frozen_embedded, rope, mask, cfg), state)
    state = jax.lax.stop_gradient(state)

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def step(p, s, e):
        return core_step(p, s, e, rope, mask, cfg)

    def body(s, i):
        return jax.lax.cond(i < k, lambda s: step(params, s, embedded), lambda s: s, s), None

    state, _ = jax.lax.scan(body, state, jnp.arange(cfg.mean_backprop_depth))
    return decode(params, state, rope, mask, cfg, remat=True)[0]
