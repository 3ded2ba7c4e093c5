"""Huginn, the recurrent-depth transformer, as Flax NNX modules used functionally.

Read top to bottom:  tokens -> embedding (x sqrt(n_embd)) -> prelude -> e
                      s_0 = state_init(e)                                (official: like-init noise)
                      s_i = core(adapter(s_{i-1}, e))   for i = 1 .. num_steps   (lax.fori_loop)
                      ln_f(s_r) -> coda -> ln_f -> tied lm head -> logits
Every block is a SandwichBlock (a norm before and after both attention and MLP). The blocks take a
*token mixer*, `mix(layer, attention, normed x) -> (output, aux)`: plain causal attention here, cached
attention in generation (`rdlm.inference`), so the prelude -> recurrence -> coda sequence is written
once, in `Huginn`. Every `nnx.Param` comes from the parameter table (`rdlm.params`: shape, logical
axes, official name, init) and carries its logical axes as sharding metadata.

Used functionally, as MaxText does: `nnx.split` gives (graphdef, state); `forward`, the train step and
generation are plain jitted functions of the plain parameter pytree (same paths as the checkpoints),
merged into a module inside the compiled function. `num_steps` is traced: one compile serves every
depth. Numerics follow the official `raven_modeling_minimal.py` (RMSNorm in fp32, RoPE on interleaved
pairs in fp32, qk bias before RoPE).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from rdlm.attention import causal_attention
from rdlm.config import ModelConfig
from rdlm.params import init_params, logical_axes
from rdlm.sharding import constrain, platform

Params = dict[str, Any]
HIDDEN = ("batch", "length", "activation_embed")  # logical axes of the residual stream


# ---- the math (stateless) -------------------------------------------------------------------------


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
    # (x0 cos - x1 sin, x1 cos + x0 sin) as pairs * cos + reversed pairs * (-sin, sin): the same roundings,
    # and no slices, whose gradients are pads to add up (a tenth of a CPU training step)
    signed_sin = sin[..., None] * jnp.array([-1.0, 1.0], jnp.float32)
    rotated = pairs * cos[..., None] + jnp.flip(pairs, axis=-1) * signed_sin
    return rotated.reshape(x.shape).astype(x.dtype)


# ---- layers ---------------------------------------------------------------------------------------


def _unstack(x: jax.Array) -> list[jax.Array]:
    """The parts of a fused projection `[b, s, parts, ...]`: a split, whose gradient is one concatenate (indexing
    would pad each part's gradient to the whole and add them up)."""
    return [part[:, :, 0] for part in jnp.split(x, x.shape[2], axis=2)]


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter with its logical axes as sharding metadata (placed later by `rdlm.sharding`)."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, p: Params, axes: Params, eps: float):
        self.scale, self.eps = _param(p["scale"], axes["scale"]), eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):
    """Multi-head attention's projections: fused qkv (+ the learned qk bias, added before RoPE) and output.
    The attention itself is the token mixer's (`Mixer`)."""

    def __init__(self, p: Params, axes: Params, cfg: ModelConfig):
        self.wqkv, self.proj = _param(p["wqkv"], axes["wqkv"]), _param(p["proj"], axes["proj"])
        self.qk_bias = _param(p["qk_bias"], axes["qk_bias"]) if cfg.qk_bias else None

    def qkv(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys, values `[batch, seq, heads, head_dim]`, RoPE applied to queries and keys."""
        qkv = checkpoint_name(jnp.einsum("bse,ecnd->bscnd", x, self.wqkv[...].astype(x.dtype)), "qkv")
        if self.qk_bias is not None:
            qkv = qkv.at[:, :, :2].add(self.qk_bias[...].astype(x.dtype))
        q, k, v = _unstack(qkv)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def out(self, y: jax.Array) -> jax.Array:
        """Heads `[b,s,n,d]` back to the residual stream."""
        return checkpoint_name(jnp.einsum("bqnd,nde->bqe", y, self.proj[...].astype(y.dtype)), "attn_out")


# A token mixer: (layer index within its stack, the layer's attention, normed x) -> (output, aux).
Mixer = Callable[[int, Attention, jax.Array], tuple[jax.Array, Any]]


def causal_mixer(rope: tuple[jax.Array, jax.Array], positions: jax.Array, segment_ids: jax.Array | None,
                 implementation: str) -> Mixer:
    """Plain self-attention over the sequence (training, the plain forward), by `model.attention`."""
    return lambda i, attn, h: (attn.out(causal_attention(*attn.qkv(h, rope), positions, segment_ids,
                                                         implementation)), None)


class GatedMLP(nnx.Module):
    """SiLU-gated MLP with a fused `fc` (gate, up)."""

    def __init__(self, p: Params, axes: Params):
        self.fc, self.proj = _param(p["fc"], axes["fc"]), _param(p["proj"], axes["proj"])

    def __call__(self, x: jax.Array) -> jax.Array:
        h = checkpoint_name(jnp.einsum("bse,egi->bsgi", x, self.fc[...].astype(x.dtype)), "mlp_fc")
        gate, up = _unstack(h)
        return checkpoint_name(jnp.einsum("bsi,ie->bse", jax.nn.silu(gate) * up, self.proj[...].astype(x.dtype)),
                               "mlp_out")


class SandwichBlock(nnx.Module):
    """norm_1 before and norm_2 after the residual add of attention; norm_3 and norm_4 around the MLP."""

    def __init__(self, p: Params, axes: Params, cfg: ModelConfig):
        self.norm_1, self.norm_2, self.norm_3, self.norm_4 = (
            RMSNorm(p[f"norm_{n}"], axes[f"norm_{n}"], cfg.norm_eps) for n in range(1, 5))
        self.attn, self.mlp = Attention(p["attn"], axes["attn"], cfg), GatedMLP(p["mlp"], axes["mlp"])

    def __call__(self, x: jax.Array, mix: Callable[[Attention, jax.Array], tuple[jax.Array, Any]]
                 ) -> tuple[jax.Array, Any]:
        """(new x, the mixer's aux output)."""
        y, aux = mix(self.attn, self.norm_1(x))
        x = self.norm_2(y + x)
        return self.norm_4(self.mlp(self.norm_3(x)) + x), aux


# ---- the injection (adapter) and the initial state: `model.injection` and `model.state_init` --------


class LinearInjection(nnx.Module):
    """The official `linear` adapter: a Linear map of concat([state, embedded input])."""

    def __init__(self, p: Params, axes: Params, cfg: ModelConfig):
        self.kernel = _param(p["kernel"], axes["kernel"])
        self.bias = _param(p["bias"], axes["bias"]) if cfg.bias else None

    def __call__(self, state: jax.Array, embedded: jax.Array) -> jax.Array:
        x = jnp.concatenate([state, embedded], axis=-1) @ self.kernel[...].astype(state.dtype)
        return x if self.bias is None else x + self.bias[...].astype(x.dtype)


class FFNInjection(nnx.Module):
    """`ffn`: a gated MLP from concat([state, embedded input]) to the width."""

    def __init__(self, p: Params, axes: Params, cfg: ModelConfig):
        self.mlp = GatedMLP(p, axes)

    def __call__(self, state: jax.Array, embedded: jax.Array) -> jax.Array:
        return self.mlp(jnp.concatenate([state, embedded], axis=-1))


class ElementwiseInjection(nnx.Module):
    """`add` (state + input), `gate` (state * input) or `none` (the state alone; it starts as the input)."""

    def __init__(self, p: Params, axes: Params, cfg: ModelConfig):
        self.kind = cfg.injection

    def __call__(self, state: jax.Array, embedded: jax.Array) -> jax.Array:
        return {"add": state + embedded, "gate": state * embedded, "none": state}[self.kind]


INJECTIONS: dict[str, type[nnx.Module]] = {"linear": LinearInjection, "ffn": FFNInjection, "add": ElementwiseInjection,
                                           "gate": ElementwiseInjection, "none": ElementwiseInjection}


def initial_state(rng: jax.Array, shape: tuple[int, ...], cfg: ModelConfig, init_scale: jax.Array) -> jax.Array:
    """s_0 by `cfg.state_init`, the official formulas, times `init_scale` (0 gives zeros):
    `like-init` truncated normal (+-3 std, std = init_std) times the embedding scale; `normal` N(0, 1);
    `embed` N(0, 1/n_embd); `zero`; `unit` N(0, 1) standardised per position. (With injection `none`
    the state starts as the embedded input instead: `Huginn.start`.)"""
    kind = cfg.state_init
    if kind == "like-init":
        x = jax.random.truncated_normal(rng, -3.0, 3.0, shape, jnp.float32) * cfg.init_std * cfg.embed_scale
    elif kind == "unit":
        x = jax.random.normal(rng, shape, jnp.float32)
        x = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True, ddof=1)  # torch.std_mean: unbiased
    else:
        std = {"normal": 1.0, "embed": 1 / np.sqrt(shape[-1]), "zero": 0.0}[kind]
        x = jax.random.normal(rng, shape, jnp.float32) * std
    return (x * init_scale).astype(cfg.dtype)


class Remat(NamedTuple):
    """What a grad step of the recurrence keeps for its backward: `step`, the checkpoint policy of the
    whole step; `layers`, whether each core layer is also checkpointed alone (its backward then holds one
    layer's activations at a time, not the step's)."""
    step: Callable
    layers: bool = False


REMAT_POLICIES: dict[str, Remat] = {  # `train.remat` (`auto`: `resolve_remat`)
    "full": Remat(jax.checkpoint_policies.nothing_saveable),  # the step's input latent; recompute the step
    "nested": Remat(jax.checkpoint_policies.nothing_saveable, layers=True),  # least memory: both, +1 forward
    "projections": Remat(jax.checkpoint_policies.save_only_these_names("qkv", "attn_out", "mlp_fc", "mlp_out")),
    "dots": Remat(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    "none": Remat(jax.checkpoint_policies.everything_saveable),  # every activation (most memory)
}


def resolve_remat(remat: str) -> str:
    """The policy `auto` stands for where the program runs: `nested` on TPU (huginn-0125 at 4096 tokens fits
    a 16 GiB v5e chip only so), `full` elsewhere (faster: no extra forward); others as given."""
    if remat != "auto":
        return remat
    return "nested" if platform() == "tpu" else "full"


# ---- the recurrent-depth model -------------------------------------------------------------------


class StepLatents(NamedTuple):
    """`rdlm.forward(..., return_step_latents=True)`: the final `logits` (fp32) and `latent` (after ln_f, in the compute dtype) as
    without it, plus each recurrence's latent after ln_f, `step_latents [max_steps, batch, seq, n_embd]` in
    the compute dtype, and with `decode_steps` each one's logit lens through coda, ln_f and head,
    `step_logits [max_steps, batch, positions, vocab_size]` in fp32 (else None). Entry i is the state after
    i + 1 recurrences (`step_latents[num_steps - 1]` is `latent`); entries from num_steps on are zeros."""
    logits: jax.Array
    latent: jax.Array
    step_latents: jax.Array
    step_logits: jax.Array | None


class Huginn(nnx.Module):
    """prelude -> `num_steps` x (adapter, core) -> coda, all blocks SandwichBlocks.

    `Huginn(config, rngs=nnx.Rngs(0))` initialises as the official code does (`rdlm.params`);
    `Huginn.from_params(config, params)` wraps a plain parameter pytree; `params_of(model)` gives it back.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None, params: Params | None = None):
        p = init_params(config, rngs.params()) if params is None else params
        axes = logical_axes(config)

        def blocks(name: str) -> nnx.List:
            return nnx.List([SandwichBlock(b, a, config) for b, a in zip(p[name], axes[name])])

        self.config = config
        self.embedding = _param(p["wte"]["embedding"], axes["wte"]["embedding"])
        self.prelude = blocks("prelude")
        self.adapter = INJECTIONS[config.injection](p.get("adapter", {}), axes.get("adapter", {}), config)
        self.core = blocks("core")
        self.coda = blocks("coda")
        self.ln_f = RMSNorm(p["ln_f"], axes["ln_f"], config.norm_eps)
        self.lm_head = None if config.tie_embeddings else _param(p["lm_head"]["kernel"], axes["lm_head"]["kernel"])

    @classmethod
    def from_params(cls, config: ModelConfig, params: Params) -> Huginn:
        return cls(config, params=params)

    @property
    def injection(self) -> nnx.Module:
        """The adapter: how the embedded input enters each recurrence (`model.injection` in the config)."""
        return self.adapter

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embedding times sqrt(n_embd), in the compute dtype."""
        cfg = self.config
        return self.embedding[...][input_ids].astype(cfg.dtype) * jnp.asarray(cfg.embed_scale, cfg.dtype)

    def run(self, blocks: nnx.List, x: jax.Array, mix: Mixer, remat: bool = False) -> tuple[jax.Array, list[Any]]:
        """The blocks in order: (x, each block's aux). With `remat`, each block's activations are
        recomputed in the backward pass."""
        auxes = []
        for i, block in enumerate(blocks):
            layer_mix = functools.partial(mix, i)
            call = functools.partial(block, mix=layer_mix)
            x, aux = (jax.checkpoint(call) if remat else call)(x)
            x = constrain(x, HIDDEN)
            auxes.append(aux)
        return x, auxes

    def start(self, rng: jax.Array, embedded: jax.Array, init_scale: jax.Array) -> jax.Array:
        """The initial latent: `initial_state`, or the embedded input itself with injection `none`."""
        if self.config.injection == "none":
            return embedded
        return initial_state(rng, embedded.shape, self.config, init_scale)

    def core_step(self, state: jax.Array, embedded: jax.Array, mix: Mixer, remat: bool = False
                  ) -> tuple[jax.Array, list[Any]]:
        """One recurrence: the injection, then the core block's layers (each rematerialised with `remat`)."""
        return self.run(self.core, self.adapter(state, embedded), mix, remat)

    def head(self, x: jax.Array) -> jax.Array:
        """Coda output -> fp32 logits: ln_f, then the tied embedding (or an own head)."""
        x = self.ln_f(x)
        if self.lm_head is None:
            return jnp.einsum("bse,ve->bsv", x, self.embedding[...].astype(x.dtype), preferred_element_type=jnp.float32)
        return jnp.einsum("bse,ev->bsv", x, self.lm_head[...].astype(x.dtype), preferred_element_type=jnp.float32)

    def readout(self, state: jax.Array, mix: Mixer, remat: bool = False, last: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, list[Any]]:
        """Final latent -> (fp32 logits, latent after ln_f, the coda's aux): ln_f, coda, then the head
        (only at position `last [batch]` of each row when given: generation needs one token's logits)."""
        x, latent, auxes = self.decoded(state, mix, remat)
        if last is not None:
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)
        return self.head(x), latent, auxes

    def decoded(self, state: jax.Array, mix: Mixer, remat: bool = False) -> tuple[jax.Array, jax.Array, list[Any]]:
        """Final latent -> (coda output, the head's input; latent after ln_f; the coda's aux)."""
        latent = self.ln_f(state)
        x, auxes = self.run(self.coda, latent, mix, remat)
        return x, latent, auxes

    def apply(self, input_ids: jax.Array, num_steps: jax.Array, init_state: jax.Array | None, init_scale: jax.Array,
              rng: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, *, max_steps: int | None = None,
              decode_steps: bool = False, decode_positions: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array] | StepLatents:
        """The forward with every argument explicit (traced): (fp32 logits, final latent after ln_f). With a
        static `max_steps`, a `StepLatents` that also records the recurrences (`step_buffers`, `record_step`)."""
        cfg = self.config
        mix = causal_mixer(rope_angles(positions, cfg.head_dim, cfg.rope_base), positions, segment_ids, cfg.attention)
        embedded, _ = self.run(self.prelude, self.embed(input_ids), mix)
        state = self.start(rng, embedded, init_scale) if init_state is None else init_state
        state = state.astype(cfg.dtype)
        record = None if max_steps is None else self.step_buffers(state, max_steps, decode_steps, decode_positions)

        def step(i: jax.Array, carry: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
            s, rec = carry
            s = self.core_step(s, embedded, mix)[0]
            return s, None if rec is None else self.record_step(rec, i, s, mix, decode_positions)

        state, record = jax.lax.fori_loop(0, num_steps, step, (state, record))
        logits, latent, _ = self.readout(state, mix)
        return (logits, latent) if record is None else StepLatents(logits, latent, *record)

    def step_buffers(self, state: jax.Array, max_steps: int, decode_steps: bool, decode_positions: jax.Array | None
                     ) -> tuple[jax.Array, jax.Array | None]:
        """Zeros for `record_step`: latents `[max_steps, *state.shape]` in the compute dtype and, with
        `decode_steps`, fp32 logits `[max_steps, batch, positions, vocab_size]` (positions: `decode_positions
        [batch, k]`'s k, else the whole sequence)."""
        latents = jnp.zeros((max_steps, *state.shape), state.dtype)
        if not decode_steps:
            return latents, None
        batch, seq = state.shape[:2]
        k = seq if decode_positions is None else decode_positions.shape[1]
        return latents, jnp.zeros((max_steps, batch, k, self.config.vocab_size), jnp.float32)

    def record_step(self, record: tuple[jax.Array, jax.Array | None], i: jax.Array, state: jax.Array, mix: Mixer,
                    decode_positions: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """Slot i of the buffers := the latent after recurrence i + 1, after ln_f, and (when decoding) its
        logits through coda, ln_f and head, at `decode_positions [batch, k]` when given (the coda still
        attends over the whole sequence). A step past the buffers (only a traced num_steps > max_steps can
        reach one) runs but is not recorded: the last slot keeps its own value."""
        latents, logits = record
        slot, kept = jnp.minimum(i, latents.shape[0] - 1), i < latents.shape[0]

        def write(buffer: jax.Array, entry: jax.Array) -> jax.Array:
            return jax.lax.dynamic_update_index_in_dim(buffer, jnp.where(kept, entry, buffer[slot]), slot, 0)

        if logits is None:
            return write(latents, self.ln_f(state)), None
        x, latent, _ = self.decoded(state, mix)
        if decode_positions is not None:
            x = jnp.take_along_axis(x, decode_positions[..., None], axis=1)
        return write(latents, latent), write(logits, self.head(x))

    def train_logits(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array, n: jax.Array,
                     k: jax.Array, rng: jax.Array, remat: str = "full") -> jax.Array:
        """fp32 logits after n recurrences without gradient and k with it (k <= mean_backprop_depth)."""
        return self.head(self.train_features(input_ids, positions, segment_ids, n, k, rng, remat))

    def train_features(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array, n: jax.Array,
                       k: jax.Array, rng: jax.Array, remat: str = "full") -> jax.Array:
        """The head's input (coda output) after n recurrences without gradient and k with it.

        The n steps run in a `fori_loop` on stop-gradient inputs (n is traced: no recompiles, no
        activations kept). The k steps run in a `scan` of static length mean_backprop_depth, each under
        `jax.checkpoint` by the `remat` policy (`REMAT_POLICIES`; `full`: one latent per step) and skipped
        (`cond`) past k; prelude and coda layers are rematerialised one by one. Gradients reach the
        prelude through the embedded input injected at each of the k steps, as in the official.
        Differentiable in this module's state.
        """
        cfg = self.config
        mix = causal_mixer(rope_angles(positions, cfg.head_dim, cfg.rope_base), positions, segment_ids, cfg.attention)
        embedded, _ = self.run(self.prelude, self.embed(input_ids), mix, remat=True)
        state = self.start(rng, embedded, jnp.float32(1.0))
        graphdef, weights = nnx.split(self)
        frozen, frozen_embedded = nnx.merge(graphdef, jax.lax.stop_gradient(weights)), jax.lax.stop_gradient(embedded)
        state = jax.lax.fori_loop(0, n, lambda _, s: frozen.core_step(s, frozen_embedded, mix)[0], state)
        state = jax.lax.stop_gradient(state)
        policy = REMAT_POLICIES[resolve_remat(remat)]

        # The cond sits inside the checkpoint: a cond's residuals are per-step scan outputs, so one outside
        # it would stack a copy of the core weights per grad step; the checkpoint's inputs are loop-invariant.
        @functools.partial(jax.checkpoint, policy=policy.step)
        def step(s, i):
            grad_step = lambda s: self.core_step(s, embedded, mix, policy.layers)[0]  # noqa: E731
            return jax.lax.cond(i < k, grad_step, lambda s: s, s), None

        state, _ = jax.lax.scan(step, state, jnp.arange(cfg.mean_backprop_depth))
        return self.decoded(state, mix, remat=True)[0]

    def __call__(self, input_ids: Any, num_steps: int | jax.Array, *, init_state: jax.Array | None = None,
                 init_scale: float = 1.0, rng: jax.Array | None = None, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, return_latents: bool = False, return_step_latents: bool = False,
                 max_steps: int | None = None, decode_steps: bool = False, decode_positions: Any = None) -> Any:
        """As `rdlm.forward`, for this module as it stands (its own components included): split, then one
        jitted function of (graphdef, state)."""
        graphdef, state = nnx.split(self)
        args = _checked(input_ids, self.config, num_steps, init_state, init_scale, rng, positions)
        recording = _recording(args[0].shape, num_steps, return_step_latents, max_steps, decode_steps, decode_positions)
        return _returned(_apply_split(graphdef, state, *args, segment_ids, **recording), return_latents)


# ---- the functional split -------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def graphdef(config: ModelConfig) -> nnx.GraphDef:
    """The module structure of a config (built abstractly, once): what `merge` fills with parameters."""
    return nnx.split(nnx.eval_shape(lambda: Huginn(config, rngs=nnx.Rngs(0))))[0]


def _int_keys(tree: Any) -> Any:
    """Our pytree (lists of layers) -> NNX's state layout (layers under integer keys)."""
    if isinstance(tree, list):
        return {i: _int_keys(x) for i, x in enumerate(tree)}
    return {k: _int_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _lists(tree: Any) -> Any:
    """NNX's state layout -> ours: integer-keyed levels become lists; `embedding` under `wte`."""
    if isinstance(tree, dict) and tree and all(isinstance(k, int) for k in tree):
        return [_lists(tree[i]) for i in range(len(tree))]
    return {k: _lists(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def merge(params: Params, config: ModelConfig) -> Huginn:
    """The module over a plain parameter pytree (inside a jitted function: no copies)."""
    tree = dict(_int_keys(params))
    tree["embedding"] = tree.pop("wte")["embedding"]
    tree["adapter"] = {"mlp": tree["adapter"]} if config.injection == "ffn" else tree.get("adapter", {})
    if "lm_head" in tree:
        tree["lm_head"] = tree["lm_head"]["kernel"]
    return nnx.merge(graphdef(config), nnx.State(tree))


def params_of(model: Huginn) -> Params:
    """The plain parameter pytree of a module: the paths and shapes of `rdlm.params`, checkpoints and HF conversion."""
    tree = _lists(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tree["wte"] = {"embedding": tree.pop("embedding")}
    if model.config.injection == "ffn":
        tree["adapter"] = tree["adapter"]["mlp"]
    elif not tree.get("adapter"):
        tree.pop("adapter", None)
    if "lm_head" in tree:
        tree["lm_head"] = {"kernel": tree["lm_head"]}
    return tree


@functools.partial(jax.jit, static_argnames=("cfg", "max_steps", "decode_steps"))
def apply(params: Params, input_ids: jax.Array, num_steps: jax.Array, init_state: jax.Array | None,
          init_scale: jax.Array, rng: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
          cfg: ModelConfig, *, max_steps: int | None = None, decode_steps: bool = False,
          decode_positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array] | StepLatents:
    """The jitted forward with every argument explicit: (fp32 logits, final latent after ln_f), or with a
    static `max_steps` the `StepLatents` of `Huginn.apply`."""
    return merge(params, cfg).apply(input_ids, num_steps, init_state, init_scale, rng, positions, segment_ids,
                                    max_steps=max_steps, decode_steps=decode_steps, decode_positions=decode_positions)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_steps", "decode_steps"))
def _apply_split(graphdef: nnx.GraphDef, state: nnx.State, *args: Any, max_steps: int | None = None,
                 decode_steps: bool = False, decode_positions: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array] | StepLatents:
    return nnx.merge(graphdef, state).apply(*args, max_steps=max_steps, decode_steps=decode_steps,
                                            decode_positions=decode_positions)


def _known(x: Any) -> np.ndarray | None:
    """x's value when it is known outside a trace (Python, NumPy, a concrete jax array), else None."""
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


def _checked(input_ids: Any, config: ModelConfig, num_steps: int | jax.Array, init_state: jax.Array | None,
             init_scale: float, rng: jax.Array | None, positions: jax.Array | None) -> tuple[Any, ...]:
    """The forward's arguments checked (named errors) and defaulted, in `Huginn.apply`'s order."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be an integer array [batch, seq], got {input_ids.dtype}{list(input_ids.shape)}")
    batch, seq = input_ids.shape
    if not 1 <= seq <= config.block_size:
        raise ValueError(f"input_ids has {seq} positions; valid range is 1..block_size={config.block_size}")
    steps = _known(num_steps)
    if steps is not None and steps < 0:
        raise ValueError(f"num_steps={steps} must be >= 0")
    expected = (batch, seq, config.n_embd)
    if init_state is not None and tuple(init_state.shape) != expected:
        raise ValueError(f"init_state has shape {tuple(init_state.shape)}, expected {expected} [batch, seq, n_embd]")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    return (input_ids, jnp.asarray(num_steps, jnp.int32), init_state, jnp.asarray(init_scale, jnp.float32),
            jax.random.key(0) if rng is None else rng, positions)


def _recording(shape: tuple[int, int], num_steps: int | jax.Array, return_step_latents: bool, max_steps: int | None,
               decode_steps: bool, decode_positions: Any) -> dict[str, Any]:
    """`Huginn.apply`'s recording keywords from the forward's, checked (named errors) and defaulted: none
    without `return_step_latents`; `max_steps` defaults to a known num_steps (at least 1); `decode_positions`
    (`[k]` or `[batch, k]`, negative from the end) becomes `[batch, k]`."""
    if not return_step_latents:
        given = [name for name, on in (("max_steps", max_steps is not None), ("decode_steps", decode_steps),
                                        ("decode_positions", decode_positions is not None)) if on]
        if given:
            raise ValueError(f"{given[0]} applies only with return_step_latents=True")
        return {}
    steps = _known(num_steps)
    if max_steps is None:
        if steps is None:
            raise ValueError("max_steps is required when num_steps is traced (a static int >= 1: the length of the "
                             "per-step buffers)")
        max_steps = max(int(steps), 1)
    lowest = 1 if steps is None else max(int(steps), 1)
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < lowest:
        raise ValueError(f"max_steps={max_steps!r} is out of range; valid range is an int >= {lowest}"
                         + ("" if steps is None else f" (num_steps={int(steps)}, at least 1)"))
    if decode_positions is not None and not decode_steps:
        raise ValueError("decode_positions applies only with decode_steps=True")
    positions = None if decode_positions is None else _decode_positions(decode_positions, *shape)
    return dict(max_steps=int(max_steps), decode_steps=bool(decode_steps), decode_positions=positions)


def _decode_positions(positions: Any, batch: int, seq: int) -> jax.Array:
    """Positions to decode per step, `[k]` (every row) or `[batch, k]`, checked -> int32 `[batch, k]`."""
    p = jnp.asarray(positions)
    if (not jnp.issubdtype(p.dtype, jnp.integer) or p.ndim not in (1, 2) or p.shape[-1] == 0
            or (p.ndim == 2 and p.shape[0] not in (1, batch))):
        raise ValueError(f"decode_positions must be integer positions [k] or [batch={batch}, k], k >= 1, got "
                         f"{p.dtype}{list(p.shape)}")
    known = _known(p)
    if known is not None and ((known < -seq) | (known >= seq)).any():
        raise ValueError(f"decode_positions {known.tolist()} out of range; valid range is -{seq}..{seq - 1} "
                         f"(seq={seq})")
    return jnp.broadcast_to(jnp.where(p < 0, p + seq, p), (batch, p.shape[-1])).astype(jnp.int32)


def _returned(out: tuple[jax.Array, jax.Array] | StepLatents, return_latents: bool) -> Any:
    """The forward's return value: the `StepLatents` when recorded, else logits (and the final latent)."""
    if isinstance(out, StepLatents):
        return out
    return out if return_latents else out[0]


def forward(params: Params, input_ids: jax.Array, config: ModelConfig, *, num_steps: int | jax.Array,
            init_state: jax.Array | None = None, init_scale: float = 1.0, rng: jax.Array | None = None,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            return_latents: bool = False, return_step_latents: bool = False, max_steps: int | None = None,
            decode_steps: bool = False, decode_positions: Any = None
            ) -> jax.Array | tuple[jax.Array, jax.Array] | StepLatents:
    """Logits `[batch, seq, vocab_size]` in fp32 after `num_steps` recurrences of the core block.

    The initial latent is `init_state` when given, else `config.state_init` (official: like-init noise)
    scaled by `init_scale` (0 gives zeros) drawn from `rng` (default: key 0, so calls are reproducible).
    `positions`/`segment_ids` `[batch, seq]` serve packed sequences (default: 0..seq-1, one segment).
    With `return_latents`, also returns the final latent state after `ln_f`, as the official does.

    With `return_step_latents`, returns a `StepLatents` (whatever `return_latents`): also the latent after
    ln_f of every recurrence, `[max_steps, batch, seq, n_embd]`, and with `decode_steps` each one through
    coda, ln_f and head (a logit lens per step), fp32 `[max_steps, batch, k, vocab_size]`. num_steps is
    traced (one compile for every depth) and an output's length cannot be, so the steps go into buffers of
    a static length `max_steps` (default: num_steps, at least 1), carried through the recurrence's loop and
    written in place one slot a step: every num_steps <= max_steps shares one compile, entries from
    num_steps on stay zeros, and decoding costs one coda + head per recurrence actually run (no second
    loop, no compile per depth). A traced num_steps above max_steps still runs all its steps, recording
    the first max_steps. Memory: the buffers hold max_steps x batch x (seq x n_embd in the compute dtype
    + k x vocab_size x 4 bytes), e.g. huginn-0125 at 32 steps over one sequence of 4096 tokens: 1.4 GB of
    bf16 latents, and 34 GB of logits at every position but 8 MB at `decode_positions=[-1]` (positions
    `[k]` for every row or `[batch, k]`, negative from the end; the coda still attends over the whole
    sequence).
    """
    args = _checked(input_ids, config, num_steps, init_state, init_scale, rng, positions)
    recording = _recording(args[0].shape, num_steps, return_step_latents, max_steps, decode_steps, decode_positions)
    return _returned(apply(params, *args, segment_ids, config, **recording), return_latents)


# ---- training: truncated backpropagation (the depths come from rdlm.recurrence) ----------------------


def forward_train(params: Params, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                  n: jax.Array, k: jax.Array, rng: jax.Array, cfg: ModelConfig, remat: str = "full") -> jax.Array:
    """`Huginn.train_logits` of the model over a plain parameter pytree (what the train step differentiates)."""
    return merge(params, cfg).train_logits(input_ids, positions, segment_ids, n, k, rng, remat)
