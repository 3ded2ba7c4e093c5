"""Typed, frozen configuration: dataclasses, YAML presets and dotted `key=value` overrides.

A config is built from a preset in `configs/` (or any YAML path) plus overrides such as
`model.mean_recurrence=8`. Every key is checked: an unknown key names the nearest valid one, a value
of the wrong type or out of range names the key and the valid range. `ModelConfig` also reads and
writes the HF `config.json` of huginn-0125 (`model_type: huginn_raven`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rdlm.errors import RdlmError

# the presets: configs/ at the top of the checkout, shipped inside the package as rdlm/presets (a link to it)
CONFIG_DIR = Path(str(importlib.resources.files("rdlm") / "presets"))


class ConfigError(RdlmError, ValueError):
    """A config key, value or file is invalid; the message names it."""


def _check(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
           choices: tuple[Any, ...] | None = None) -> dict[str, Any]:
    """Field metadata describing the valid range of a value."""
    return {"ge": ge, "gt": gt, "le": le, "choices": choices}


@dataclass(frozen=True)
class ModelConfig:
    """Huginn architecture (defaults: the released huginn-0125, 3.5B parameters)."""

    n_embd: int = field(default=5280, metadata=_check(ge=2))
    n_heads: int = field(default=55, metadata=_check(ge=1))
    intermediate_size: int = field(default=17920, metadata=_check(ge=1))
    vocab_size: int = field(default=65536, metadata=_check(ge=1))  # rows of the embedding (padded vocab)
    padding_multiple: int = field(default=4096, metadata=_check(ge=1))  # kept for config.json round trips
    block_size: int = field(default=4096, metadata=_check(ge=1))  # longest sequence (RoPE table length)
    n_layers_in_prelude: int = field(default=2, metadata=_check(ge=0))
    n_layers_in_recurrent_block: int = field(default=4, metadata=_check(ge=1))
    n_layers_in_coda: int = field(default=2, metadata=_check(ge=0))
    mean_recurrence: int = field(default=32, metadata=_check(ge=1))
    mean_backprop_depth: int = field(default=8, metadata=_check(ge=1))
    rope_base: float = field(default=50000.0, metadata=_check(gt=0))
    norm_eps: float = field(default=1e-6, metadata=_check(gt=0, le=1))
    qk_bias: bool = True
    bias: bool = False  # bias of the adapter, as the official `config.bias`
    tie_embeddings: bool = True
    dtype: str = field(default="float32", metadata=_check(choices=("float32", "bfloat16")))  # compute
    # Attention implementation (rdlm.attention): a compute choice, free to change on resume.
    attention: str = field(default="auto", metadata=_check(choices=("auto", "xla", "chunked", "splash", "cudnn")))
    # How the embedded input enters each recurrence (official `injection_type`; huginn-0125: linear) and
    # how the latent starts (official `state_init`; huginn-0125: like-init). See rdlm.model.
    injection: str = field(default="linear", metadata=_check(choices=("linear", "ffn", "add", "gate", "none")))
    state_init: str = field(default="like-init", metadata=_check(choices=("like-init", "normal", "embed", "zero",
                                                                            "unit")))

    def __post_init__(self) -> None:
        if self.n_embd % self.n_heads:
            raise ConfigError(f"model.n_embd={self.n_embd} must be divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.n_embd / model.n_heads = {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def n_layers(self) -> int:
        return self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda

    @property
    def effective_expected_depth(self) -> int:
        """Layers run at mean recurrence; sets the official output-projection init."""
        return (self.n_layers_in_prelude + self.n_layers_in_coda
                + self.n_layers_in_recurrent_block * self.mean_recurrence)

    @property
    def init_std(self) -> float:
        return math.sqrt(2 / (5 * self.n_embd))

    @property
    def out_proj_std(self) -> float:
        return self.init_std / math.sqrt(2 * self.effective_expected_depth)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.n_embd)

    # ---- HF config.json of huginn form -------------------------------------------------------------
    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """The `config.json` the official `RavenConfig` loads."""
        out: dict[str, Any] = {
            "architectures": ["RavenForCausalLM"],
            "model_type": "huginn_raven",
            "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                         "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
            "torch_dtype": torch_dtype,
            "n_layers": self.n_layers,
            **_HF_FIXED,
        }
        for ours, theirs in _HF_KEYS.items():
            out[theirs] = getattr(self, ours)
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a huginn `config.json`; refuses architectures this model does not implement."""
        hf = dict(hf)
        for alias, name in (("num_attention_heads", "n_heads"), ("hidden_size", "n_embd"),
                            ("tie_word_embeddings", "tie_embeddings")):
            if alias in hf:
                hf.setdefault(name, hf[alias])
        if hf.get("model_type", "huginn_raven") != "huginn_raven":
            raise ConfigError(f"{source}: model_type={hf['model_type']!r}, expected 'huginn_raven'")
        for key, expected in _HF_FIXED.items():
            if key in hf and hf[key] != expected:
                raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported (only {expected!r})")
        if hf.get("num_key_value_heads", hf.get("n_heads")) != hf.get("n_heads"):
            raise ConfigError(f"{source}: num_key_value_heads={hf['num_key_value_heads']} != n_heads (no GQA in huginn)")
        kwargs = {ours: hf[theirs] for ours, theirs in _HF_KEYS.items() if theirs in hf}
        cfg = _build(cls, kwargs, prefix="model", source=source)
        if "n_layers" in hf and hf["n_layers"] != cfg.n_layers:
            raise ConfigError(f"{source}: n_layers={hf['n_layers']} but prelude+core+coda = {cfg.n_layers}")
        return cfg

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike) -> ModelConfig:
        try:
            hf = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read HF config {path}: {e}") from e
        return cls.from_hf_dict(hf, source=str(path))


# Our field name -> official config.json key (the table keeps them in one place).
_HF_KEYS = {f: f for f in ("n_embd", "n_heads", "intermediate_size", "vocab_size", "padding_multiple", "block_size",
                           "n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda",
                           "mean_recurrence", "mean_backprop_depth", "rope_base", "norm_eps", "qk_bias", "bias",
                           "tie_embeddings")} | {"injection": "injection_type", "state_init": "state_init"}
# Official settings this implementation has (and only these); written on export, checked on import.
_HF_FIXED = {"architecture_class_name": "RecurrentGPT", "block_class_name": "SandwichBlock",
             "norm_class_name": "RMSNorm_llama", "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU"}


@dataclass(frozen=True)
class DataConfig:
    """Documents -> tokens -> packed rows. Sources: the bundled Shakespeare plays, text files (one
    document per file), JSONL (one document per line, field `jsonl_key`), ArrayRecord (one UTF-8
    document per record)."""

    source: str = field(default="shakespeare", metadata=_check(choices=("shakespeare", "text", "jsonl", "array_record")))
    paths: tuple = ()  # glob patterns for text / jsonl / array_record
    jsonl_key: str = "text"
    tokenizer: str = ""  # sentencepiece .model (tools/train_tokenizer.py makes one) or HF tokenizer.json
    packing: str = field(default="concat", metadata=_check(choices=("concat", "first_fit")))
    packing_bins: int = field(default=16, metadata=_check(ge=1))  # first_fit only
    val_fraction: float = field(default=0.05, metadata=_check(ge=0, le=0.5))  # documents held out
    seed: int = field(default=0, metadata=_check(ge=0))
    prefetch: int = field(default=2, metadata=_check(ge=0))  # batches prepared by a background thread


# Each optimizer's own values for the OptimConfig fields left at None (`OptimConfig.setting`); a field
# an optimizer does not list does not apply to it, and setting it is an error.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"eps": 1e-8},  # official recpre/settings.py optim_config
    # eps: ELLISAdam's own default (the launch config left it out); the flags: huginn-0125's launch config
    "ellis-adam": {"eps": 1e-6, "atan2": True, "update_clipping": True, "running_init": True},
}


@dataclass(frozen=True)
class OptimConfig:
    """Adam-type optimizer with a warmup-stable-decay schedule (rdlm.optim). Defaults: huginn-0125's launch
    config (launch_configs/frontier_nebel_512_nodes.yaml: lr 4e-5, betas 0.9/0.95, weight decay 4e-5 fully
    decoupled, 4096 warmup and 4096 cooldown steps, linear, min lr 0; clip 1.0 from settings.py).

    `name`: adamw (optax's Adam moments; the default) or ellis-adam (the official ELLISAdam, which the
    launch config used, with its flags atan2, update_clipping and running_init). Fields left at None (eps
    and those flags) take the chosen optimizer's value from `OPTIMIZER_DEFAULTS`, so
    `optim.name=ellis-adam` alone is the launch config; the flags are refused with adamw."""

    name: str = field(default="adamw", metadata=_check(choices=tuple(OPTIMIZER_DEFAULTS)))
    lr: float = field(default=4e-5, metadata=_check(gt=0))
    b1: float = field(default=0.9, metadata=_check(ge=0, le=1))
    b2: float = field(default=0.95, metadata=_check(ge=0, le=1))
    eps: float | None = field(default=None, metadata=_check(gt=0))  # None: adamw 1e-8, ellis-adam 1e-6
    weight_decay: float = field(default=4e-5, metadata=_check(ge=0))
    # Official `decouple_wd`: each step multiplies weights by 1 - weight_decay * lr_t / lr (independent
    # of the lr's size); False: the usual AdamW 1 - lr_t * weight_decay.
    decoupled_weight_decay: bool = True
    warmup_steps: int = field(default=4096, metadata=_check(ge=0))
    cooldown_steps: int = field(default=4096, metadata=_check(ge=0))
    min_lr: float = field(default=0.0, metadata=_check(ge=0))
    grad_clip: float = field(default=1.0, metadata=_check(ge=0))  # global norm; 0 disables
    # ellis-adam only (None: True). atan2 (official `atan_adam`): the update is atan2(m, sqrt(v)) instead
    # of m / (sqrt(v) + eps); update_clipping: each tensor's step is divided by max(1, RMS(g / sqrt(v)));
    # running_init: the moments start at the first gradient (m = g, v = g^2) instead of zeros.
    atan2: bool | None = None
    update_clipping: bool | None = None
    running_init: bool | None = None

    def __post_init__(self) -> None:
        for key in ("atan2", "update_clipping", "running_init"):
            value = getattr(self, key)
            if value is not None and key not in OPTIMIZER_DEFAULTS[self.name]:
                users = [name for name, own in OPTIMIZER_DEFAULTS.items() if key in own]
                raise ConfigError(f"optim.{key}={json.dumps(value)} applies only to optim.name={' or '.join(users)}, "
                                  f"not {self.name}")

    def setting(self, key: str) -> Any:
        """The value of field `key`, or the chosen optimizer's own when it is None."""
        value = getattr(self, key)
        return OPTIMIZER_DEFAULTS[self.name].get(key) if value is None else value

    def resolved(self) -> OptimConfig:
        """This config with every field left at None set to the chosen optimizer's value (what runs: a run
        saved with `eps: 1e-08` and one leaving adamw's eps at None are the same run)."""
        return dataclasses.replace(self, **{k: self.setting(k) for k in OPTIMIZER_DEFAULTS[self.name]})


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: batch, sampled recurrence, precision, logging, evaluation."""

    steps: int = field(default=1000, metadata=_check(ge=1))
    batch_size: int = field(default=8, metadata=_check(ge=1))  # sequences per optimizer step (global)
    grad_accum: int = field(default=1, metadata=_check(ge=1))  # micro-batches per step
    seq_len: int = field(default=256, metadata=_check(ge=2))
    seed: int = field(default=0, metadata=_check(ge=0))
    # The depth sampler (official `sampling_scheme`; rdlm.recurrence): one of RECURRENCE_SCHEMES, optionally
    # `<scheme>-curriculum-N` (t and s ramp up over the first N steps). huginn-0125's is the default.
    recurrence: str = "poisson-lognormal-filling"
    param_dtype: str = field(default="float32", metadata=_check(choices=("float32", "bfloat16")))  # master weights
    # What each grad step of the recurrence keeps for the backward (rdlm.model.REMAT_POLICIES): full keeps
    # only its input latent; nested too, and recomputes it layer by layer (least memory); projections also
    # the named matmul outputs; dots every matmul without batch dimensions; none everything; auto: nested
    # on TPU, else full.
    remat: str = field(default="auto", metadata=_check(choices=("auto", "full", "nested", "projections", "dots",
                                                                 "none")))
    # Positions whose fp32 logits and cross-entropy are computed at once (MaxText's vocab tiling): the
    # [batch, seq, vocab] logits are never whole, in the forward or the backward.
    loss_chunk: int = field(default=2048, metadata=_check(ge=1))
    nonfinite: str = field(default="stop", metadata=_check(choices=("stop", "skip")))
    max_nonfinite_steps: int = field(default=20, metadata=_check(ge=1))  # consecutive skipped steps that end a run
    log_every: int = field(default=10, metadata=_check(ge=1))
    tensorboard: bool = True  # TensorBoard event files beside metrics.jsonl (tensorboardX)
    eval_every: int = field(default=200, metadata=_check(ge=1))
    eval_batches: int = field(default=8, metadata=_check(ge=1))
    eval_recurrence: tuple = (1, 4, 8, 16, 32, 64)  # validation depths, as the official trainer logs
    checkpoint_every: int = field(default=500, metadata=_check(ge=1))
    keep_checkpoints: int = field(default=3, metadata=_check(ge=1))
    async_checkpoint: bool = True
    out_dir: str = "runs/train"  # config.yml, metrics.jsonl (process 0); local
    checkpoint_dir: str = ""  # default: {out_dir}/checkpoints; multi-host runs need shared storage (gs://...)
    restart_from_scratch: bool = False  # when every checkpoint was found damaged: train from step 0 (else refuse)

    def __post_init__(self) -> None:
        parse_recurrence(self.recurrence)


# The official `sampling_scheme` names (recpre/model_dynamic.py), by their formulas in rdlm.recurrence.
RECURRENCE_SCHEMES = ("poisson-lognormal-filling", "poisson-lognormal", "poisson-lognormal-fill", "poisson-fill",
                      "poisson-unbounded", "poisson-bounded", "negative-binomial", "simple", "non-uniform", "bptt",
                      "geometric", "fixed", "full", "non-recurrent")
# Those whose formula needs t = mean_recurrence - mean_backprop_depth >= 1 (a log, a 1/t or a draw below 2t).
_RECURRENCE_NEEDS_T = ("poisson-lognormal", "poisson-lognormal-fill", "poisson-bounded", "negative-binomial",
                       "simple", "non-uniform", "bptt", "geometric")
_CURRICULUM = re.compile(r"(.+)-curriculum-([0-9]+)")


def parse_recurrence(scheme: str) -> tuple[str, int | None]:
    """`train.recurrence` -> (scheme, curriculum steps or None): `poisson-fill-curriculum-500` ->
    ('poisson-fill', 500). Names match exactly (the official matches substrings in a fixed order)."""
    match = _CURRICULUM.fullmatch(scheme)
    base, ramp = (match[1], int(match[2])) if match else (scheme, None)
    if base not in RECURRENCE_SCHEMES or ramp == 0:
        raise ConfigError(f"train.recurrence: {scheme!r} is not one of {list(RECURRENCE_SCHEMES)}, each optionally "
                          f"followed by -curriculum-N (a ramp over the first N >= 1 steps)")
    return base, ramp


def check_recurrence(scheme: str, model: ModelConfig) -> tuple[str, int | None]:
    """`parse_recurrence`, and whether `model`'s depths suit the scheme's formula."""
    base, ramp = parse_recurrence(scheme)
    t, s = model.mean_recurrence - model.mean_backprop_depth, model.mean_backprop_depth
    if t < 1 and base in _RECURRENCE_NEEDS_T:
        allowed = [name for name in RECURRENCE_SCHEMES if name not in _RECURRENCE_NEEDS_T]
        raise ConfigError(f"train.recurrence={scheme} needs model.mean_recurrence={model.mean_recurrence} above "
                          f"model.mean_backprop_depth={s} (its formula needs t = their difference >= 1); schemes "
                          f"that allow t = 0: {allowed}")
    if ramp is not None and ramp * (max(t, s) + 1) >= 2**31:
        raise ConfigError(f"train.recurrence={scheme}: a ramp of {ramp} steps is too long for int32 step arithmetic "
                          f"at mean_recurrence={model.mean_recurrence}")
    return base, ramp


MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple | None  # one mesh axis, several (sharded over their product), or None: replicated


@dataclass(frozen=True)
class RulesConfig:
    """Logical axis -> mesh axes, one table for every parameter, optimizer state and activation.

    Defaults: FSDP over the embedding dimension of every weight, tensor parallelism over heads, MLP
    columns and vocabulary (only meaningful where mesh.tensor divides them: huginn-0125's 55 heads do
    not divide 2, 4 or 8, so use mesh.tensor=1 or set `mesh.rules.heads=null`), batch over data x fsdp.
    A rule that does not divide a dimension is an error, never a silent replication.
    """

    batch: MeshAxes = ("data", "fsdp")
    length: MeshAxes = None
    activation_embed: MeshAxes = None
    vocab: MeshAxes = "tensor"
    embed: MeshAxes = "fsdp"
    heads: MeshAxes = "tensor"
    head_dim: MeshAxes = None
    qkv: MeshAxes = None
    gate: MeshAxes = None
    mlp: MeshAxes = "tensor"
    adapter: MeshAxes = None

    def __post_init__(self) -> None:
        for name in (f.name for f in dataclasses.fields(self)):
            value = getattr(self, name)
            axes = value if isinstance(value, tuple) else () if value is None else (value,)
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ConfigError(f"mesh.rules.{name}: {bad[0]!r} is not a mesh axis; valid: {list(MESH_AXES)} or null")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor); -1 takes the remaining devices. Multi-host: on Cloud TPU VMs
    jax.distributed is initialised automatically; elsewhere give coordinator, num_processes, process_id."""

    data: int = field(default=-1, metadata=_check(ge=-1))
    fsdp: int = field(default=1, metadata=_check(ge=-1))
    tensor: int = field(default=1, metadata=_check(ge=-1))
    rules: RulesConfig = field(default_factory=RulesConfig)
    coordinator: str = ""  # host:port of process 0, for multi-process runs outside Cloud TPU
    num_processes: int = field(default=1, metadata=_check(ge=1))
    process_id: int = field(default=0, metadata=_check(ge=0))

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if 0 in sizes.values():
            raise ConfigError(f"mesh axis sizes must be >= 1 or -1 (fill), got {sizes}")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"at most one mesh axis may be -1 (fill), got {sizes}")


@dataclass(frozen=True)
class Config:
    """Everything a run needs; one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def check_trainable(self) -> None:
        """Cross-section constraints of a training run (a model-only config need not meet them)."""
        if self.train.batch_size % self.train.grad_accum:
            raise ConfigError(f"train.batch_size={self.train.batch_size} must be divisible by "
                              f"train.grad_accum={self.train.grad_accum}")
        if self.train.seq_len > self.model.block_size:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.block_size={self.model.block_size}")
        if any(not isinstance(r, int) or r < 0 for r in self.train.eval_recurrence):
            raise ConfigError(f"train.eval_recurrence={list(self.train.eval_recurrence)} must be integers >= 0")
        check_recurrence(self.train.recurrence, self.model)


# ---- building and validation ---------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against a field type; ints are accepted for floats, nothing else is converted."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for member in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, member, key)
            except ConfigError:
                pass
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _check_range(value: Any, meta: dict[str, Any], key: str) -> None:
    ge, gt, le, choices = meta.get("ge"), meta.get("gt"), meta.get("le"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
    lo = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else "(-inf"
    rng = f"{lo}, {le if le is not None else 'inf'}{']' if le is not None else ')'}"
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison
        raise ConfigError(f"{key}: {value!r} is not a finite number; valid range {rng}")
    if ((ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le)):
        raise ConfigError(f"{key}: {value!r} is out of range {rng}")


def _unknown(key: str, valid: list[str], source: str) -> ConfigError:
    near = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1, cutoff=0.5)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(prefix + v for v in valid)}"
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    """Construct dataclass `cls` from a nested dict, validating every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            raise _unknown(key, list(fields), source)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key, source)
        else:
            kwargs[name] = _coerce(value, tp, key)
            if kwargs[name] is not None:
                _check_range(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dicts and lists (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg, dict_factory=lambda kv: {k: list(v) if isinstance(v, tuple) else v for k, v in kv})


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parents[:i + 1])} is a value, not a section (override {key})")
        node = child
    node[leaf] = value


class _Loader(yaml.SafeLoader):
    """YAML as users write it (the 1.2 core schema's scalars): `1e-3` is a float, only true/false are
    booleans (`on`, `no`, `y` stay strings); tags other than the standard ones are refused."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT)]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^[-+]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+|\.(?:inf|Inf|INF))$"
    r"|^\.(?:nan|NaN|NAN)$"), list("-+0123456789."))


def parse_yaml(text: str, where: str) -> Any:
    """`text` parsed by `_Loader`; any parser error becomes a ConfigError naming `where`."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from e


def _field_type(key: str) -> Any:
    """The declared type of a dotted `Config` key, or None when the key does not exist."""
    tp: Any = Config
    for part in key.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`['model.n_heads=4', ...]` -> `[('model.n_heads', 4), ...]`. Values are YAML (`_Loader`), except
    that a key declared `str` takes the text as written (`train.out_dir=on` is the folder `on`)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        if _field_type(key) is str:
            out.append((key, raw))
        else:
            out.append((key, parse_yaml(raw, f"override {key}={raw}") if raw.strip() else None))
    return out


def resolve_preset(name: str | os.PathLike) -> Path:
    """A YAML path, or a preset name from `configs/` (`tiny` -> configs/tiny.yml)."""
    path = Path(name)
    preset = CONFIG_DIR / f"{name}.yml"
    if path.suffix in (".yml", ".yaml") or path.is_file() or (path.exists() and not preset.is_file()):
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file; pass a YAML file or a preset name")
        return path
    if not preset.exists():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yml"))
        raise ConfigError(f"unknown preset {str(name)!r}; presets in {CONFIG_DIR}: {', '.join(names)}")
    return preset


def load_config(name: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Preset (or YAML file) plus dotted overrides -> validated `Config`."""
    data: dict[str, Any] = {}
    source = "defaults"
    if name is not None:
        path = resolve_preset(name)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} cannot be read: {e}") from e
        data = parse_yaml(text, str(path))
        data = {} if data is None else data
    return _with(data, overrides, source)


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """A validated `Config` from nested dicts (a saved config); missing keys take their defaults."""
    return _with(data, [], source)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with dotted overrides applied, validated again."""
    return _with(to_dict(cfg), overrides, "loaded config")


def _with(data: dict[str, Any], overrides: list[str], source: str) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model:, data:, ...), "
                          f"got {type(data).__name__}")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value, source=source)
    if overrides:
        source = f"{source} + overrides"
    return _build(Config, data, prefix="", source=source)


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
