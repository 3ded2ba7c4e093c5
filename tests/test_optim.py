import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rdlm.config import ConfigError, OptimConfig, load_config
from rdlm.optim import ScaleByEllisAdamState, lr_schedule, make_optimizer, optimizer_chain, state_shardings
from rdlm.params import decay_mask, init_params
from rdlm.sharding import make_mesh
from rdlm.train import init_state, make_train_step

TINY = load_config("tiny").model


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0))


def test_trapezoid_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, cooldown_steps=5, min_lr=0.1)
    lr = lr_schedule(cfg, total_steps=20)
    values = [float(lr(i)) for i in range(20)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4:15] == pytest.approx([1.0] * 11)
    assert values[15:] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.1])  # floored at min_lr


def test_decay_mask_follows_official_groups():
    mask = decay_mask(TINY)
    assert mask["wte"]["embedding"] and mask["adapter"]["kernel"] and mask["core"][0]["attn"]["wqkv"]
    assert not mask["ln_f"]["scale"] and not mask["core"][1]["norm_4"]["scale"]
    assert not mask["prelude"][0]["attn"]["qk_bias"]


@pytest.mark.parametrize("name", ["adamw", "ellis-adam"])
@pytest.mark.parametrize("decoupled", [True, False])
def test_weight_decay_scaling(params, decoupled, name):
    """With zero gradients only decay acts: x(1 - wd * lr_t / lr) when decoupled, x(1 - lr_t * wd) otherwise."""
    cfg = OptimConfig(name=name, lr=0.01, weight_decay=0.1, warmup_steps=4, cooldown_steps=0,
                      decoupled_weight_decay=decoupled)
    opt = make_optimizer(cfg, TINY, total_steps=100)
    updates, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    new = optax.apply_updates(params, updates)
    lr0 = 0.01 / 4
    factor = 1 - (0.1 * lr0 / 0.01 if decoupled else lr0 * 0.1)
    np.testing.assert_allclose(new["core"][0]["mlp"]["fc"], params["core"][0]["mlp"]["fc"] * factor, rtol=1e-6)
    np.testing.assert_array_equal(new["core"][0]["norm_1"]["scale"], params["core"][0]["norm_1"]["scale"])


@pytest.mark.parametrize("name, factor", [("adamw", 0.1), ("ellis-adam", 1.0)])
def test_gradients_are_clipped_to_global_norm(params, name, factor):
    """The first moment after one step is (1 - b1) times the clipped gradient (adamw), or the clipped
    gradient itself (ellis-adam's running init)."""
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 10.0), params)
    for clip, expected in [(1.0, factor * 1.0), (0.0, factor * float(optax.global_norm(grads)))]:
        opt = make_optimizer(OptimConfig(name=name, grad_clip=clip, b1=0.9), TINY, total_steps=10)
        _, state = jax.jit(opt.update)(grads, opt.init(params), params)
        assert float(optax.global_norm(state[1].mu)) == pytest.approx(expected, rel=1e-5)


# ---- ellis-adam: the official ELLISAdam -------------------------------------------------------------

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "ellis_adam.npz")
NAMES = ("wte", "wqkv", "qk_bias", "proj", "norm")
# the official parameter groups of the fixture's tensors: embedding and matrices decay, bias and norm not
MASK = {"wte": True, "wqkv": True, "qk_bias": False, "proj": True, "norm": False}
# the fixture's cases (tests/fixtures/README.md): official ELLISAdam(lr=6e-3, weight_decay=0.1, ...)
CASES = {
    "huginn": OptimConfig(name="ellis-adam"),
    "eps_clip": OptimConfig(name="ellis-adam", b1=0.8, b2=0.9, eps=1e-3, atan2=False, running_init=False,
                            decoupled_weight_decay=False),
    "eps_running": OptimConfig(name="ellis-adam", b2=0.99, eps=1e-4, atan2=False, update_clipping=False),
}


def _on_mesh(opt: optax.GradientTransformation, params: dict, state: optax.OptState) -> tuple[dict, optax.OptState]:
    """`params` and `state` over 8 devices: tensors split along their first dimension where it divides."""
    mesh = jax.make_mesh((8,), ("fsdp",))
    spec = {k: NamedSharding(mesh, PartitionSpec("fsdp") if v.shape[0] % 8 == 0 else PartitionSpec()) for k, v in
            params.items()}
    state_spec = optax.tree_map_params(opt, lambda _, s: s, state, spec,
                                       transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))
    return jax.device_put(params, spec), jax.device_put(state, state_spec)


@pytest.mark.parametrize("case, sharded", [("huginn", False), ("huginn", True), ("eps_clip", False),
                                           ("eps_running", False)])
def test_ellis_adam_matches_official(case, sharded):
    """Five steps of fixed gradients (a spike, zero rows, a tiny step) at the fixture's per-step learning
    rates give the official ELLISAdam's parameters after every step and its moments after the last; also
    with tensors split over 8 devices (update clipping's RMS then spans the shards)."""
    cfg = dataclasses.replace(CASES[case], lr=6e-3, weight_decay=0.1, grad_clip=0.0)
    lrs = jnp.asarray(FIXTURE["lr"])
    opt = optimizer_chain(cfg, MASK, lambda count: lrs[count])
    params = {k: jnp.asarray(FIXTURE[f"params0/{k}"]) for k in NAMES}
    state = opt.init(params)
    if sharded:
        params, state = _on_mesh(opt, params, state)
        assert params["wte"].sharding.spec == state[1].mu["wte"].sharding.spec == PartitionSpec("fsdp")
    update = jax.jit(opt.update)
    for step in range(len(lrs)):
        grads = {k: jax.device_put(FIXTURE[f"grads/{k}"][step], params[k].sharding) for k in NAMES}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for k in NAMES:
            expected = FIXTURE[f"{case}/params/{k}"][step]
            np.testing.assert_allclose(params[k], expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max(),
                                       err_msg=f"{case} step {step + 1} {k}")
    for moment in ("mu", "nu"):
        for k in NAMES:
            expected = FIXTURE[f"{case}/{moment}/{k}"]
            np.testing.assert_allclose(getattr(state[1], moment)[k], expected, rtol=1e-6,
                                       atol=1e-6 * np.abs(expected).max(), err_msg=f"{case} {moment} {k}")


def test_optimizer_defaults_follow_the_chosen_optimizer():
    """Fields left unset take the chosen optimizer's value: ellis-adam alone is huginn-0125's launch config."""
    ellis = load_config("tiny", ["optim.name=ellis-adam"]).optim
    assert [ellis.setting(k) for k in ("eps", "atan2", "update_clipping", "running_init")] == [1e-6, True, True, True]
    assert (ellis.lr, ellis.b1, ellis.b2, ellis.weight_decay) == (1e-3, 0.9, 0.95, 4e-5)
    assert OptimConfig().setting("eps") == 1e-8 and OptimConfig(eps=1e-5).setting("eps") == 1e-5
    assert not load_config("tiny", ["optim.name=ellis-adam", "optim.running_init=false"]).optim.setting("running_init")


@pytest.mark.parametrize("overrides, words", [
    (["optim.name=sgd"], ["optim.name", "'sgd'", "['adamw', 'ellis-adam']"]),
    (["optim.atan2=false"], ["optim.atan2=false", "optim.name=ellis-adam", "not adamw"]),
    (["optim.name=ellis-adam", "optim.update_clipping=1"], ["optim.update_clipping", "expected bool"]),
    (["optim.name=ellis-adam", "optim.eps=0"], ["optim.eps", "out of range (0, inf)"]),
])
def test_bad_optimizer_settings_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_ellis_adam_trains_a_tiny_model():
    config = load_config("tiny", ["optim.name=ellis-adam", "train.batch_size=2", "model.n_layers_in_prelude=1",
                                  "model.n_layers_in_recurrent_block=1", "model.n_layers_in_coda=1"])
    optimizer = make_optimizer(config.optim, config.model, 10)
    state = init_state(config, optimizer)
    before = state["params"]["core"][0]["mlp"]["fc"].copy()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.model.vocab_size, (2, 32), dtype=np.int32)
    batch = {"inputs": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones_like(ids),
             "positions": np.broadcast_to(np.arange(32, dtype=np.int32), ids.shape).copy(),
             "segment_ids": np.ones_like(ids)}
    step = make_train_step(config, optimizer)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch, 1, 1)
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
    assert int(state["opt_state"][1].count) == 3
    assert not np.allclose(state["params"]["core"][0]["mlp"]["fc"], before)
    assert losses[2] < losses[1] < losses[0]  # the same batch each step


def test_ellis_adam_state_is_sharded_like_its_parameters():
    """`state_shardings`: the moments follow their parameter, the step counter is replicated."""
    config = load_config("tiny", ["optim.name=ellis-adam", "mesh.data=1", "mesh.fsdp=8"])
    optimizer = make_optimizer(config.optim, config.model, 10)
    params = jax.eval_shape(lambda: init_params(config.model, jax.random.key(0)))
    abstract = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params), "step": 0, "rng": 0}
    shardings = state_shardings(abstract, optimizer, config.model, config.mesh.rules, make_mesh(config.mesh))
    moments = shardings["opt_state"][1]
    assert isinstance(moments, ScaleByEllisAdamState)
    assert moments.mu == moments.nu == shardings["params"]
    assert moments.mu["core"][0]["mlp"]["fc"].spec[0] == "fsdp"
    assert moments.count.spec == PartitionSpec()
