import jax
import numpy as np
import pytest

import rdlm
from rdlm.config import load_config
from rdlm.params import count_params, logical_axes, param_specs

TINY = load_config("tiny").model


def test_every_spec_is_consistent():
    specs = param_specs(TINY)
    assert len({s.path for s in specs}) == len({s.hf_name for s in specs}) == len(specs)
    for s in specs:
        assert len(s.axes) == len(s.shape), s.path
        assert np.prod(s.shape) == np.prod(s.hf_shape), s.path
        x = np.arange(np.prod(s.hf_shape), dtype=np.float32).reshape(s.hf_shape)
        np.testing.assert_array_equal(s.to_hf(s.from_hf(x)), x)


def test_linear_layout_is_official_matmul():
    """Our kernels compute exactly what the official Linear(x) = x @ W.T computes."""
    wqkv = next(s for s in param_specs(TINY) if s.hf_name.endswith("core_block.0.attn.Wqkv.weight"))
    w = np.random.default_rng(0).standard_normal(wqkv.hf_shape).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((3, TINY.n_embd)).astype(np.float32)
    ours = np.einsum("be,ecnd->bcnd", x, wqkv.from_hf(w)).reshape(3, -1)
    np.testing.assert_allclose(ours, x @ w.T, rtol=1e-5, atol=1e-5)


def test_init_follows_official_stds():
    cfg = load_config("tiny", ["model.n_embd=256", "model.intermediate_size=512"]).model
    p = rdlm.init_params(cfg, jax.random.key(0))
    trunc = 0.9866  # std of a unit normal truncated at +-3
    block = p["core"][0]
    assert float(block["attn"]["wqkv"].std()) == pytest.approx(trunc * cfg.init_std, rel=0.02)
    assert float(block["attn"]["proj"].std()) == pytest.approx(trunc * cfg.out_proj_std, rel=0.02)
    assert float(block["mlp"]["fc"][:, 0].std()) == pytest.approx(trunc * cfg.init_std, rel=0.02)
    assert float(block["mlp"]["fc"][:, 1].std()) == pytest.approx(trunc * cfg.out_proj_std, rel=0.02)
    assert np.all(np.asarray(block["norm_3"]["scale"]) == 1) and np.all(np.asarray(block["attn"]["qk_bias"]) == 0)
    assert len(p["prelude"]) == 2 and len(p["core"]) == 4 and len(p["coda"]) == 2


def test_logical_axes_cover_every_parameter():
    p = rdlm.init_params(TINY, jax.random.key(0))
    axes = logical_axes(TINY)
    jax.tree.map(lambda x, a: None if len(a) == x.ndim else pytest.fail(str(a)), p, axes,
                 is_leaf=lambda a: isinstance(a, tuple))


def test_huginn_0125_has_3_5b_parameters():
    n = count_params(load_config("huginn_0125").model)
    assert 3.5e9 < n < 3.6e9, n
