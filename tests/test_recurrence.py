"""Sampled recurrence and truncated backpropagation (the training forward)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdlm import model
from rdlm.config import load_config
from rdlm.params import init_params

TINY = load_config("tiny").model


def test_sampler_matches_the_official_distribution():
    """n + k = p = Poisson(LogNormal(log(mean) - 1/8, 1/2)) + 1; k = min(s, p), n = max(p - s, 0)."""
    cfg = dataclasses.replace(TINY, mean_recurrence=32, mean_backprop_depth=8)
    keys = jax.random.split(jax.random.key(0), 40000)
    n, k = jax.vmap(lambda key: model.sample_recurrence(key, cfg))(keys)
    n, k = np.asarray(n), np.asarray(k)
    p = n + k
    np.testing.assert_array_equal(k, np.minimum(8, p))
    np.testing.assert_array_equal(n, np.maximum(p - 8, 0))
    rng = np.random.default_rng(0)  # the same law drawn with numpy
    ref = rng.poisson(rng.lognormal(np.log(32) - 0.125, 0.5, 40000)) + 1
    assert p.mean() == pytest.approx(ref.mean(), rel=0.02)  # both ~33
    assert p.std() == pytest.approx(ref.std(), rel=0.05)
    assert np.quantile(p, 0.9) == pytest.approx(np.quantile(ref, 0.9), rel=0.05)
    assert p.min() >= 1


def test_sampler_is_a_function_of_the_key_and_fixed_is_fixed():
    a = model.sample_recurrence(jax.random.key(5), TINY)
    assert a == model.sample_recurrence(jax.random.key(5), TINY)
    assert model.sample_recurrence(jax.random.key(5), TINY, "fixed") == (4, 4)


def _unrolled(params, ids, pos, seg, n, k, rng, cfg):
    """Reference: plain Python loops, stop_gradient around the n steps."""
    mix = model.causal_mixer(model.rope_angles(pos, cfg.head_dim, cfg.rope_base), pos, seg, "xla")
    m, frozen = model.merge(params, cfg), model.merge(jax.lax.stop_gradient(params), cfg)
    e, _ = m.run(m.prelude, m.embed(ids), mix)
    s = m.start(rng, e, jnp.float32(1.0))
    for _ in range(n):
        s = frozen.core_step(s, jax.lax.stop_gradient(e), mix)[0]
    s = jax.lax.stop_gradient(s)
    for _ in range(k):
        s = m.core_step(s, e, mix)[0]
    return m.readout(s, mix)[0]


def test_truncated_backprop_gradients_equal_unrolled_reference():
    params = init_params(TINY, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    seg = jnp.array([[1] * 9 + [2] * 7, [1] * 16])

    def loss(fn, p, n, k):
        logits = fn(p, ids, pos, seg, n, k, jax.random.key(3), TINY)
        return jnp.mean(logits * jnp.cos(jnp.arange(TINY.vocab_size)))  # any non-trivial scalar

    grad = jax.jit(jax.grad(lambda p, n, k: loss(model.forward_train, p, n, k)))
    for n, k in [(0, 4), (3, 2), (6, 4), (2, 0)]:
        ours = grad(params, jnp.int32(n), jnp.int32(k))
        ref = jax.grad(lambda q, n=n, k=k: loss(_unrolled, q, n, k))(params)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()) + 1e-12)
    assert grad._cache_size() == 1  # every (n, k) from one compile
    zero_k = grad(params, jnp.int32(5), jnp.int32(0))
    assert float(jnp.abs(zero_k["core"][0]["mlp"]["fc"]).max()) == 0  # core gets no gradient without grad steps


def _temp_bytes(cfg, shape=(2, 32)):
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct(shape, jnp.int32)

    def loss(p, ids, n, k):
        return model.forward_train(p, ids, ids, ids, n, k, jax.random.key(0), cfg).mean()
    compiled = jax.jit(jax.grad(loss)).lower(params, ids, jnp.int32(0), jnp.int32(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_activation_memory_does_not_grow_with_mean_recurrence():
    small = _temp_bytes(dataclasses.replace(TINY, mean_recurrence=4, mean_backprop_depth=4))
    large = _temp_bytes(dataclasses.replace(TINY, mean_recurrence=64, mean_backprop_depth=4))
    deeper_backprop = _temp_bytes(dataclasses.replace(TINY, mean_recurrence=64, mean_backprop_depth=16))
    assert abs(large - small) <= 0.1 * small
    assert deeper_backprop > small  # what does grow: the k_max latents kept for the backward pass


def test_grad_steps_keep_no_copy_of_the_core_weights():
    """A skipped grad step (`cond`) must not make the scan keep the core weights per step: with weights far
    larger than the activations, 12 more grad steps add less than half a copy of the core."""
    wide = dataclasses.replace(TINY, n_embd=256, n_heads=4, intermediate_size=1024)
    core_bytes = 4 * sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: init_params(wide, jax.random.key(0)))["core"]))
    grow = (_temp_bytes(dataclasses.replace(wide, mean_backprop_depth=16), (1, 8))
            - _temp_bytes(dataclasses.replace(wide, mean_backprop_depth=4), (1, 8)))
    assert grow < core_bytes / 2, (grow, core_bytes)


def test_remat_policies_give_the_same_gradients_and_trade_memory():
    """`train.remat`: every policy computes the same gradients; keeping more (none) costs more temporaries
    than recomputing (full)."""
    params = init_params(TINY, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY.vocab_size)

    def grads(remat):
        def loss(p):
            return model.forward_train(p, ids, ids, ids, jnp.int32(2), jnp.int32(4), jax.random.key(3), TINY,
                                       remat).mean()
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled(params), compiled.memory_analysis().temp_size_in_bytes

    full, full_temp = grads("full")
    for remat in set(model.REMAT_POLICIES) - {"full"}:
        other, temp = grads(remat)
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(full), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        if remat == "none":
            assert temp > full_temp


def test_auto_remat_is_nested_on_tpu_only(monkeypatch):
    assert model.resolve_remat("auto") == "full" and model.resolve_remat("dots") == "dots"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert model.resolve_remat("auto") == "nested" and model.resolve_remat("full") == "full"
