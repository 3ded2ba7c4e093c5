import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rdlm.config import OptimConfig, load_config
from rdlm.optim import lr_schedule, make_optimizer
from rdlm.params import decay_mask, init_params

TINY = load_config("tiny").model


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


@pytest.mark.parametrize("decoupled", [True, False])
def test_weight_decay_scaling(decoupled):
    """With zero gradients only decay acts: x(1 - wd * lr_t / lr) when decoupled, x(1 - lr_t * wd) otherwise."""
    cfg = OptimConfig(lr=0.01, weight_decay=0.1, warmup_steps=4, cooldown_steps=0, decoupled_weight_decay=decoupled)
    params = init_params(TINY, jax.random.key(0))
    opt = make_optimizer(cfg, TINY, total_steps=100)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    new = optax.apply_updates(params, updates)
    lr0 = 0.01 / 4
    factor = 1 - (0.1 * lr0 / 0.01 if decoupled else lr0 * 0.1)
    np.testing.assert_allclose(new["core"][0]["mlp"]["fc"], params["core"][0]["mlp"]["fc"] * factor, rtol=1e-6)
    np.testing.assert_array_equal(new["core"][0]["norm_1"]["scale"], params["core"][0]["norm_1"]["scale"])


def test_gradients_are_clipped_to_global_norm():
    """The first Adam moment after one step is (1 - b1) times the clipped gradient."""
    params = init_params(TINY, jax.random.key(0))
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 10.0), params)
    for clip, expected in [(1.0, 0.1 * 1.0), (0.0, 0.1 * float(optax.global_norm(grads)))]:
        opt = make_optimizer(OptimConfig(grad_clip=clip, b1=0.9), TINY, total_steps=10)
        _, state = opt.update(grads, opt.init(params), params)
        assert float(optax.global_norm(state[1].mu)) == pytest.approx(expected, rel=1e-5)
