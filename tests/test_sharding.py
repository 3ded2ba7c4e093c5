"""Meshes on 8 virtual CPU devices: equal results on every mesh, the golden huginn-0125 specs,
checkpoints across meshes, and the errors a bad rule gives."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rdlm import sharding
from rdlm.checkpoint import TrainCheckpointer
from rdlm.config import ConfigError, load_config, to_dict
from rdlm.optim import make_optimizer, state_shardings
from rdlm.params import init_params
from rdlm.train import init_state, loss_and_grads
from conftest import REPO

MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2)]


def mesh_config(shape, *extra):
    data, fsdp, tensor = shape
    return load_config("tiny", [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
                                "train.grad_accum=2", "train.batch_size=16", *extra])


def test_eight_virtual_devices():
    assert jax.device_count() == 8


@pytest.fixture(scope="module")
def reference():
    config = mesh_config((1, 1, 1))
    params = init_params(config.model, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.model.vocab_size, (16, 32), dtype=np.int32)
    seg = np.where(np.arange(32) < 20, 1, 2).astype(np.int32) * np.ones((16, 1), np.int32)
    pos = np.where(seg == 1, np.arange(32), np.arange(32) - 20).astype(np.int32)
    mask = np.ones_like(ids)
    mask[-1, 25:] = 0
    batch = {"inputs": ids, "targets": np.roll(ids, -1, 1), "segment_ids": seg, "positions": pos, "loss_mask": mask}
    fn = jax.jit(loss_and_grads, static_argnums=5)
    loss, grads, _ = fn(params, batch, jnp.int32(2), jnp.int32(3), jax.random.key(1), config)
    return params, batch, float(loss), grads


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_loss_and_gradients_equal_single_device(reference, shape):
    params, batch, ref_loss, ref_grads = reference
    config = mesh_config(shape)
    mesh, rules = sharding.make_mesh(config.mesh), config.mesh.rules
    param_sh = sharding.named(mesh, sharding.param_partition_specs(config.model, rules, mesh))
    batch_sh = sharding.batch_sharding(rules, mesh)
    fn = jax.jit(loss_and_grads, static_argnums=5, in_shardings=(param_sh, batch_sh, None, None, None),
                 out_shardings=(None, param_sh, None))
    with sharding.activate(mesh, rules):
        loss, grads, _ = fn(jax.device_put(params, param_sh), jax.device_put(batch, batch_sh), jnp.int32(2),
                            jnp.int32(3), jax.random.key(1), config)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-6)
    for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True):
        scale = float(jnp.abs(ref).max()) + 1e-30
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
    wqkv = grads["core"][0]["attn"]["wqkv"].sharding.spec  # the gradient really is sharded as the rules say
    expected = PartitionSpec("fsdp" if shape[1] > 1 else None, None, "tensor" if shape[2] > 1 else None, None)
    assert wqkv == expected


def test_huginn_0125_specs_match_golden_file():
    golden = json.loads((REPO / "tests/golden/huginn_0125_fsdp8.json").read_text())
    config = load_config("huginn_0125", ["mesh.data=1", "mesh.fsdp=8"])
    assert sharding.describe(config.model, config.mesh, 8) == golden
    assert golden["params_per_device"] * 8 == pytest.approx(3_564_976_800, rel=1e-3)  # qk biases replicated


def test_rule_that_does_not_divide_is_named():
    config = load_config("huginn_0125", ["mesh.tensor=2", "mesh.fsdp=4", "mesh.data=1"])
    with pytest.raises(sharding.ShardingError, match=r"prelude/0/attn/wqkv: dimension 2 \(heads, size 55\) is not "
                                                     r"divisible by mesh axes \('tensor',\) of size 2"):
        sharding.describe(config.model, config.mesh, 8)
    replicated = load_config("huginn_0125", ["mesh.tensor=2", "mesh.fsdp=4", "mesh.data=1", "mesh.rules.heads=null"])
    specs = sharding.describe(replicated.model, replicated.mesh, 8)["params"]
    assert specs["core/0/attn/wqkv"]["spec"] == ["fsdp", None, None, None]
    assert specs["core/0/mlp/fc"]["spec"] == ["fsdp", None, "tensor"]


def test_mesh_errors():
    assert sharding.mesh_shape(load_config("tiny", ["mesh.fsdp=4"]).mesh, 8) == (2, 4, 1)
    with pytest.raises(ConfigError, match="needs 4 devices, 8 are available"):
        sharding.mesh_shape(load_config("tiny", ["mesh.data=2", "mesh.fsdp=2"]).mesh, 8)
    with pytest.raises(ConfigError, match="at most one mesh axis may be -1"):
        load_config("tiny", ["mesh.fsdp=-1"])
    with pytest.raises(sharding.ShardingError, match="mesh axis 'fsdp' is used by dimensions 0 and 1"):
        sharding.describe(load_config("tiny", ["mesh.rules.vocab=fsdp"]).model,
                          load_config("tiny", ["mesh.rules.vocab=fsdp", "mesh.fsdp=8"]).mesh, 8)


def test_checkpoint_moves_between_meshes(tmp_path):
    config = mesh_config((1, 8, 1))
    optimizer = make_optimizer(config.optim, config.model, 10)

    def sharded_state(cfg):
        mesh = sharding.make_mesh(cfg.mesh)
        shardings = state_shardings(jax.eval_shape(lambda: init_state(cfg, optimizer)), optimizer,
                                     cfg.model, cfg.mesh.rules, mesh)
        return jax.jit(lambda: init_state(cfg, optimizer), out_shardings=shardings)(), shardings

    state, _ = sharded_state(config)
    state["params"] = jax.tree.map(lambda p: p + 1.0, state["params"])  # not the init values
    saver = TrainCheckpointer(tmp_path, keep=1, async_save=True)
    saver.save(3, state, None, to_dict(config))
    saver.wait()
    other = mesh_config((2, 2, 2))
    template, shardings = sharded_state(other)
    step, restored = TrainCheckpointer(tmp_path, keep=1, async_save=False).restore_latest(template)
    assert step == 3
    for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == s


def test_distributed_initialisation_is_chosen_by_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(sharding.importlib.util, "find_spec", lambda name: None)
    assert not sharding.initialize_distributed(load_config("tiny").mesh)
    explicit = load_config("tiny", ["mesh.coordinator=10.0.0.2:1234", "mesh.num_processes=4", "mesh.process_id=2"])
    assert sharding.initialize_distributed(explicit.mesh)
    assert calls[-1] == (("10.0.0.2:1234",), {"num_processes": 4, "process_id": 2})
    monkeypatch.setattr(sharding.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    assert sharding.initialize_distributed(load_config("tiny").mesh)
    assert calls[-1] == ((), {})


def test_activation_constraint_is_checked():
    config = mesh_config((8, 1, 1))
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.mesh.rules):
        with pytest.raises(sharding.ShardingError, match=r"activation: dimension 0 \(batch, size 4\)"):
            jax.jit(lambda x: sharding.constrain(x, ("batch", "length", "activation_embed")))(jnp.zeros((4, 8, 2)))
        y = jax.jit(lambda x: sharding.constrain(x, ("batch", "length", "activation_embed")))(jnp.zeros((8, 8, 2)))
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("data", None, None)), 3)
