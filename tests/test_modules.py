"""The NNX module API: built from the parameter table, used functionally, components swappable."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rdlm
from rdlm import model
from rdlm.config import load_config
from rdlm.params import logical_axes, param_specs
from conftest import rel_l2

TINY = load_config("tiny").model


def test_module_is_the_parameter_table():
    m = rdlm.Huginn(TINY, rngs=nnx.Rngs(0))
    params = rdlm.params_of(m)
    reference = rdlm.init_params(TINY, nnx.Rngs(0).params())  # the official init, from the module's key
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)
    _, state = nnx.split(m)
    axes = [v.out_sharding for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))]
    assert sorted(map(tuple, axes)) == sorted(s.axes for s in param_specs(TINY))
    assert jax.tree.leaves(logical_axes(TINY), is_leaf=lambda x: isinstance(x, tuple))


def test_module_call_equals_functional_forward(official):
    path, expected = official
    cfg, params = rdlm.load_hf_checkpoint(path, dtype=jnp.float32)
    m = rdlm.Huginn.from_params(cfg, params)
    logits = m(expected["input_ids"], num_steps=4, init_scale=0.0)
    np.testing.assert_array_equal(logits, rdlm.forward(params, expected["input_ids"], cfg, num_steps=4, init_scale=0.0))
    assert rel_l2(logits, expected["logits_zero_4"]) <= 1e-5
    back = rdlm.params_of(m)
    assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))


def test_split_and_merge_inside_jit():
    m = rdlm.Huginn(TINY, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(m)
    ids = jnp.arange(8)[None] % TINY.vocab_size

    @jax.jit
    def logits(state, ids):
        return nnx.merge(graphdef, state)(ids, num_steps=2)

    np.testing.assert_allclose(logits(state, ids), m(ids, num_steps=2), atol=1e-5)  # another compile: fp32 rounding


def _train_losses(cfg, steps=16):
    params = rdlm.init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (4, 16), 0, 16)  # a small vocabulary: learnable in a few steps
    pos = jnp.broadcast_to(jnp.arange(16), (4, 16))
    opt = optax.adam(3e-3)

    def loss(p, key):
        logits = model.forward_train(p, ids[:, :-1], pos[:, :-1], jnp.ones_like(pos[:, :-1]), 2, 2, key, cfg)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(p, o, key):
        value, grads = jax.value_and_grad(loss)(p, key)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o, value

    state, losses = opt.init(params), []
    for i in range(steps):
        params, state, value = step(params, state, jax.random.key(i))
        losses.append(float(value))
    return losses


# every injection and every state init at least once (six compiles instead of 25)
VARIANTS = [("linear", "like-init"), ("ffn", "embed"), ("add", "unit"), ("gate", "normal"), ("none", "like-init"),
            ("linear", "zero")]


@pytest.mark.parametrize("injection,state_init", VARIANTS, ids=[f"{a}+{b}" for a, b in VARIANTS])
def test_every_injection_and_state_init_trains(injection, state_init):
    cfg = dataclasses.replace(TINY, injection=injection, state_init=state_init, mean_backprop_depth=2)
    losses = _train_losses(cfg)
    assert all(np.isfinite(losses)) and min(losses[-3:]) < losses[0] - 0.25, losses


def test_state_init_formulas():
    shape = (4, 64, 256)
    cfg = dataclasses.replace(TINY, n_embd=256, n_heads=4)
    draw = {k: model.initial_state(jax.random.key(0), shape, dataclasses.replace(cfg, state_init=k), 1.0)
            for k in ("like-init", "normal", "embed", "zero", "unit")}
    like = draw["like-init"] / cfg.embed_scale
    assert abs(float(like.std()) - cfg.init_std * 0.987) < 0.02 * cfg.init_std  # truncation at 3 std: 0.987
    assert float(jnp.abs(like).max()) <= 3 * cfg.init_std + 1e-6
    assert abs(float(draw["normal"].std()) - 1) < 0.02 and abs(float(draw["embed"].std()) - 1 / 16) < 0.002
    assert float(jnp.abs(draw["zero"]).max()) == 0
    np.testing.assert_allclose(draw["unit"].std(-1, ddof=1), 1, rtol=1e-5)
    np.testing.assert_allclose(draw["unit"].mean(-1), 0, atol=1e-5)
    assert float(jnp.abs(model.initial_state(jax.random.key(0), shape, cfg, 0.0)).max()) == 0


def test_variants_round_trip_through_the_hf_format(tmp_path):
    from rdlm.hf import read_hf, write_hf

    cfg = dataclasses.replace(TINY, injection="ffn", state_init="unit")
    params = rdlm.init_params(cfg, jax.random.key(0))
    write_hf(params, cfg, tmp_path / "hf")
    back_cfg, back = rdlm.load_hf_checkpoint(tmp_path / "hf")
    assert back_cfg == cfg and read_hf(tmp_path / "hf")[0] == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_own_injection_module_plugs_in():
    """A researcher's injection: any module mapping (state, embedded) -> state. The module call runs it, and
    truncated backprop (`train_logits`) over the split state reaches its parameter."""

    class Scaled(nnx.Module):
        def __init__(self):
            self.alpha = nnx.Param(jnp.full((TINY.n_embd,), 0.5))

        def __call__(self, state, embedded):
            return state + self.alpha[...] * embedded

    m = rdlm.Huginn(TINY, rngs=nnx.Rngs(0))
    ids = jnp.arange(8)[None]
    linear = m(ids, num_steps=3)
    m.adapter = Scaled()
    own = m(ids, num_steps=3)
    assert not np.allclose(own, linear)
    graphdef, state = nnx.split(m)

    def loss(state):
        return nnx.merge(graphdef, state).train_logits(ids, ids, jnp.ones_like(ids), 2, 2, jax.random.key(0)).mean()

    grads = jax.jit(jax.grad(loss))(state)
    assert float(jnp.abs(grads["adapter"]["alpha"][...]).sum()) > 0
