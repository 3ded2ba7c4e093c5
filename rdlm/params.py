"""The one table of Huginn parameters.

Each `ParamSpec` row says, for one tensor: where it lives in our parameter pytree, its shape and
logical axis names (for sharding rules), the official PyTorch tensor name and shape, how the two
layouts map onto each other, and the official initialisation. The model (`init_params`), the
converter (both directions) and the sharding rules all read this table and nothing else.

Layouts: a PyTorch `Linear` weight is `[out, in]`; ours puts the input dimensions first and splits
fused dimensions so that heads and MLP columns carry their own logical axes
(`Wqkv [3E, E] -> wqkv [E, 3, heads, head_dim]`, `fc [2I, E] -> fc [E, 2, I]`, ...). Both directions
are a transpose and a reshape, so export-then-import is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rdlm.config import ModelConfig

Path = tuple[Any, ...]  # e.g. ("core", 0, "attn", "wqkv")
Init = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]

# Tensors the official checkpoint may hold that are not parameters of ours: the persistent RoPE
# table (always recomputed in fp32 here) and, with tied embeddings, a copy of the embedding.
ROPE_BUFFER = "freqs_cis"
TIED_HEAD = "lm_head.weight"


def _trunc_normal(std: float) -> Init:
    """Official init: normal(0, std) truncated at +-3 std."""
    return lambda key, shape, dtype: (jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32) * std).astype(dtype)


def _glu(std_gate: float, std_up: float) -> Init:
    """Official `init_glu`: the gate half and the up half of the fused `fc` get different stds."""
    def init(key, shape, dtype):
        k1, k2 = jax.random.split(key)
        half = (shape[0], 1, shape[2])
        return jnp.concatenate([_trunc_normal(std_gate)(k1, half, dtype), _trunc_normal(std_up)(k2, half, dtype)], 1)
    return init


def _ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


@dataclass(frozen=True)
class ParamSpec:
    path: Path
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis name of each dimension
    hf_name: str
    hf_shape: tuple[int, ...]
    linear: bool  # official is a Linear weight [out, in]: ours = weight.T reshaped
    init: Init
    decay: bool = True  # weight decay applies (the official exempts norms and biases)

    def from_hf(self, x: np.ndarray) -> np.ndarray:
        """Official tensor -> our layout (same dtype)."""
        if self.linear:
            x = np.ascontiguousarray(x.T)
        return x.reshape(self.shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Our layout -> official tensor (same dtype); exact inverse of `from_hf`."""
        x = np.asarray(x)
        if self.linear:
            return np.ascontiguousarray(x.reshape(self.hf_shape[::-1]).T)
        return x.reshape(self.hf_shape)


def _block(cfg: ModelConfig, path: Path, hf: str) -> list[ParamSpec]:
    """One SandwichBlock: 4 RMSNorms, attention with fused qkv (+ qk bias), gated MLP."""
    e, h, d, i = cfg.n_embd, cfg.n_heads, cfg.head_dim, cfg.intermediate_size
    std, out = cfg.init_std, cfg.out_proj_std

    def norm(n: int) -> ParamSpec:
        return ParamSpec((*path, f"norm_{n}", "scale"), (e,), ("embed",), f"{hf}.norm_{n}.weight", (e,), False, _ones,
                         decay=False)

    rows = [
        norm(1),
        ParamSpec((*path, "attn", "wqkv"), (e, 3, h, d), ("embed", "qkv", "heads", "head_dim"),
                  f"{hf}.attn.Wqkv.weight", (3 * e, e), True, _trunc_normal(std)),
    ]
    if cfg.qk_bias:
        rows.append(ParamSpec((*path, "attn", "qk_bias"), (2, h, d), ("qkv", "heads", "head_dim"),
                              f"{hf}.attn.qk_bias", (2, 1, h, d), False, _zeros, decay=False))
    rows += [
        ParamSpec((*path, "attn", "proj"), (h, d, e), ("heads", "head_dim", "embed"),
                  f"{hf}.attn.proj.weight", (e, e), True, _trunc_normal(out)),
        norm(2),
        ParamSpec((*path, "mlp", "fc"), (e, 2, i), ("embed", "gate", "mlp"),
                  f"{hf}.mlp.fc.weight", (2 * i, e), True, _glu(std, out)),
        ParamSpec((*path, "mlp", "proj"), (i, e), ("mlp", "embed"),
                  f"{hf}.mlp.proj.weight", (e, i), True, _trunc_normal(out)),
        norm(3),
        norm(4),
    ]
    return rows


def _injection(cfg: ModelConfig) -> list[ParamSpec]:
    """The adapter's parameters: a Linear of [state, input] (`linear`, with `bias`), a gated MLP from
    2 * n_embd (`ffn`, as the official `GatedMLP(in_features=2 * n_embd)`), none for `add`, `gate`, `none`."""
    e, i, std, out = cfg.n_embd, cfg.intermediate_size, cfg.init_std, cfg.out_proj_std
    if cfg.injection == "ffn":
        return [ParamSpec(("adapter", "fc"), (2 * e, 2, i), ("adapter", "gate", "mlp"), "transformer.adapter.fc.weight",
                          (2 * i, 2 * e), True, _glu(std, out)),
                ParamSpec(("adapter", "proj"), (i, e), ("mlp", "embed"), "transformer.adapter.proj.weight", (e, i), True,
                          _trunc_normal(out))]
    if cfg.injection != "linear":
        return []
    rows = [ParamSpec(("adapter", "kernel"), (2 * e, e), ("adapter", "embed"), "transformer.adapter.weight",
                      (e, 2 * e), True, _trunc_normal(std))]
    if cfg.bias:
        rows.append(ParamSpec(("adapter", "bias"), (e,), ("embed",), "transformer.adapter.bias", (e,), False, _zeros,
                              decay=False))
    return rows


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Every parameter of the model, in the official state-dict order."""
    e, v, std = cfg.n_embd, cfg.vocab_size, cfg.init_std
    rows = [ParamSpec(EMBEDDING, (v, e), ("vocab", "embed"), "transformer.wte.weight", (v, e), False,
                      _trunc_normal(std))]
    for n in range(cfg.n_layers_in_prelude):
        rows += _block(cfg, ("prelude", n), f"transformer.prelude.{n}")
    rows += _injection(cfg)
    for n in range(cfg.n_layers_in_recurrent_block):
        rows += _block(cfg, ("core", n), f"transformer.core_block.{n}")
    for n in range(cfg.n_layers_in_coda):
        rows += _block(cfg, ("coda", n), f"transformer.coda.{n}")
    rows.append(ParamSpec(("ln_f", "scale"), (e,), ("embed",), "transformer.ln_f.weight", (e,), False, _ones,
                          decay=False))
    if not cfg.tie_embeddings:
        rows.append(ParamSpec(("lm_head", "kernel"), (e, v), ("embed", "vocab"), TIED_HEAD, (v, e), True,
                              _trunc_normal(std)))
    return rows


EMBEDDING = ("wte", "embedding")  # path of the token embedding (also the tied LM head)


def spec_at(cfg: ModelConfig, path: Path) -> ParamSpec:
    return next(s for s in param_specs(cfg) if s.path == path)


def rope_buffer_shape(cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of the official persistent `freqs_cis` buffer (cos and sin of every position)."""
    return (1, cfg.block_size, 1, cfg.head_dim // 2, 2)


# ---- pytrees from paths -----------------------------------------------------------------------------


def unflatten(items: dict[Path, Any]) -> dict[str, Any]:
    """{path: leaf} -> nested dicts, with integer-keyed levels (layers) turned into lists.

    Absent list positions become None, so a subset of the paths gives a partial tree (for Orbax
    partial saves while streaming a conversion).
    """
    root: dict[Any, Any] = {}
    for path, leaf in items.items():
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf

    def listify(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if node and all(isinstance(k, int) for k in node):
            return [listify(node.get(k)) for k in range(max(node) + 1)]
        return {k: listify(val) for k, val in node.items()}

    return listify(root)


def get_path(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Official initialisation of every parameter (one independent key per tensor)."""
    return unflatten({s.path: s.init(jax.random.fold_in(key, n), s.shape, dtype)
                      for n, s in enumerate(param_specs(cfg))})


def abstract_params(cfg: ModelConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    return unflatten({s.path: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)) for s in param_specs(cfg)})


def logical_axes(cfg: ModelConfig) -> dict[str, Any]:
    """Pytree of logical axis names, same structure as the parameters."""
    return unflatten({s.path: s.axes for s in param_specs(cfg)})


def decay_mask(cfg: ModelConfig) -> dict[str, Any]:
    """Pytree of booleans: which parameters get weight decay."""
    return unflatten({s.path: s.decay for s in param_specs(cfg)})


def count_params(cfg: ModelConfig) -> int:
    return sum(int(np.prod(s.shape)) for s in param_specs(cfg))
