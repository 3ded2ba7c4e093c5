"""Device mesh and logical-axis sharding rules (MaxText style), applied with jit + NamedSharding.

Every parameter has logical axis names in the parameter table (`rdlm.params`); `mesh.rules` maps
each logical axis to mesh axes. This module turns that into PartitionSpecs for the parameters, the
optimizer state (same specs as the parameter they track), the batch and the activations
(`constrain`, a no-op outside `activate`). A rule that does not divide a dimension is an error that
names the parameter, the dimension and the mesh axis. `python tools/bench.py memory CONFIG` prints
the specs of a config on any device count, and the memory per chip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rdlm.errors import RdlmError
from rdlm.config import MESH_AXES, ConfigError, MeshConfig, ModelConfig, RulesConfig
from rdlm.params import get_path, param_specs, unflatten


class ShardingError(RdlmError, ValueError):
    """A sharding rule cannot be applied; the message names the tensor, dimension and mesh axis."""


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the -1 axis filled; the product must be the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                          f"{num_devices} are available")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (sharding by jit in/out shardings and constraints)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _axes_of(rules: RulesConfig, logical: str | None) -> tuple[str, ...]:
    if logical is None:
        return ()
    value = getattr(rules, logical)
    return value if isinstance(value, tuple) else () if value is None else (value,)


def shards(rules: RulesConfig, mesh: Mesh, logical: str) -> int:
    """Number of pieces a dimension with this logical axis is split into."""
    return math.prod(mesh.shape[a] for a in _axes_of(rules, logical))


def logical_spec(name: str, shape: tuple[int, ...], logical: tuple[str | None, ...], rules: RulesConfig,
                 mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of one array; checks divisibility and that no mesh axis is used twice."""
    entries, used = [], {}
    for dim, (size, axis) in enumerate(zip(shape, logical, strict=True)):
        mesh_axes = tuple(a for a in _axes_of(rules, axis) if mesh.shape[a] > 1)
        for a in mesh_axes:
            if a in used:
                raise ShardingError(f"{name}: mesh axis {a!r} is used by dimensions {used[a]} and {dim} "
                                    f"(logical {logical}); change mesh.rules")
            used[a] = dim
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % ways:
            raise ShardingError(f"{name}: dimension {dim} ({axis}, size {size}) is not divisible by mesh axes "
                                f"{mesh_axes} of size {ways}; set mesh.rules.{axis}=null to replicate it, or "
                                f"choose a mesh whose {'x'.join(mesh_axes)} divides {size}")
        entries.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*entries)


def param_partition_specs(model_cfg: ModelConfig, rules: RulesConfig, mesh: Mesh) -> dict[str, Any]:
    """Pytree of PartitionSpecs, same structure as the parameters."""
    return unflatten({s.path: logical_spec("/".join(map(str, s.path)), s.shape, s.axes, rules, mesh)
                      for s in param_specs(model_cfg)})


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda p: NamedSharding(mesh, p), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(rules: RulesConfig, mesh: Mesh) -> NamedSharding:
    """[batch, length] arrays: batch over the rule's mesh axes."""
    return NamedSharding(mesh, logical_spec("batch", (0, 0), ("batch", "length"), rules, mesh))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's rows -> global arrays (every host passes its own, distinct rows)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def initialize_distributed(cfg: MeshConfig) -> bool:
    """Start jax.distributed for multi-process runs (before any device is touched); True if started.

    Explicit when `mesh.coordinator` is set (GPU clusters, CPU tests); on Cloud TPU VMs (libtpu
    installed) `jax.distributed.initialize()` discovers the slice's hosts itself, one or many."""
    if jax.distributed.is_initialized():
        return False
    if cfg.coordinator:
        jax.distributed.initialize(cfg.coordinator, num_processes=cfg.num_processes, process_id=cfg.process_id)
        return True
    if importlib.util.find_spec("libtpu") is not None:
        jax.distributed.initialize()
        return True
    return False


# ---- activations ----------------------------------------------------------------------------------

_ACTIVE: list[tuple[Mesh, RulesConfig]] = []


@contextlib.contextmanager
def activate(mesh: Mesh, rules: RulesConfig) -> Iterator[None]:
    """Within this context (while tracing), `constrain` pins activations to the rules."""
    _ACTIVE.append((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active() -> tuple[Mesh, RulesConfig] | None:
    """The (mesh, rules) of the innermost `activate`, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def platform() -> str:
    """The platform the program being traced runs on: the active mesh's devices' (an ahead-of-time compile
    for a TPU topology traces on a CPU host), else JAX's default backend."""
    return _ACTIVE[-1][0].devices.flat[0].platform if _ACTIVE else jax.default_backend()


def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` by logical axis names; identity when no mesh is active."""
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    spec = logical_spec("activation", x.shape, logical, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain_params(tree: Any, model_cfg: ModelConfig) -> Any:
    """Pin a parameter-shaped pytree (gradients, accumulators) to the parameters' logical axes."""
    if not _ACTIVE:
        return tree
    return unflatten({s.path: constrain(get_path(tree, s.path), s.axes) for s in param_specs(model_cfg)})


# ---- reporting ------------------------------------------------------------------------------------


def describe(model_cfg: ModelConfig, mesh_cfg: MeshConfig, num_devices: int) -> dict[str, Any]:
    """Every parameter's shape, logical axes and PartitionSpec on a mesh of `num_devices` (no devices
    needed: an abstract mesh), plus parameter bytes per device."""
    shape = mesh_shape(mesh_cfg, num_devices)
    mesh = jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    rows, per_device = {}, 0
    for s in param_specs(model_cfg):
        spec = logical_spec("/".join(map(str, s.path)), s.shape, s.axes, mesh_cfg.rules, mesh)
        ways = math.prod(math.prod(mesh.shape[a] for a in (e if isinstance(e, tuple) else (e,)))
                         for e in spec if e is not None)
        per_device += math.prod(s.shape) // ways
        rows["/".join(map(str, s.path))] = {"shape": list(s.shape), "axes": list(s.axes),
                                            "spec": [list(e) if isinstance(e, tuple) else e for e in spec]}
    return {"mesh": dict(zip(MESH_AXES, shape)), "params_per_device": per_device, "params": rows}
