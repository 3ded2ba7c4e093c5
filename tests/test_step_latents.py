"""Per-step latents and their logit lens: `rdlm.forward(..., return_step_latents=True)`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
from rdlm import model
from rdlm.config import load_config

TINY = load_config("tiny").model
IDS = jax.random.randint(jax.random.key(1), (2, 8), 0, TINY.vocab_size)


@pytest.fixture(scope="module")
def params():
    return rdlm.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def recorded(params):
    """3 recurrences recorded into buffers of 5 steps, every position decoded."""
    return rdlm.forward(params, IDS, TINY, num_steps=3, max_steps=5, return_step_latents=True, decode_steps=True)


def test_shapes_and_the_final_outputs_unchanged(params, recorded):
    logits, latent = rdlm.forward(params, IDS, TINY, num_steps=3, return_latents=True)
    assert isinstance(recorded, rdlm.StepLatents)
    assert recorded.step_latents.shape == (5, 2, 8, TINY.n_embd) and recorded.step_latents.dtype == jnp.float32
    assert recorded.step_logits.shape == (5, 2, 8, TINY.vocab_size) and recorded.step_logits.dtype == jnp.float32
    np.testing.assert_array_equal(recorded.logits, logits)
    np.testing.assert_array_equal(recorded.latent, latent)
    np.testing.assert_allclose(recorded.step_latents[2], latent, atol=1e-6)  # the last step's is return_latents'
    assert not np.allclose(recorded.step_latents[1], latent)
    assert not jnp.any(recorded.step_latents[3:]) and not jnp.any(recorded.step_logits[3:])  # past num_steps: zeros


def test_each_step_decodes_to_the_forward_at_that_depth(params, recorded):
    for i in range(3):
        np.testing.assert_allclose(recorded.step_logits[i], rdlm.forward(params, IDS, TINY, num_steps=i + 1),
                                   atol=2e-5)
    _, latent = rdlm.forward(params, IDS, TINY, num_steps=1, return_latents=True)
    np.testing.assert_allclose(recorded.step_latents[0], latent, atol=1e-6)


def test_latents_alone_and_zero_steps(params, recorded):
    plain = rdlm.forward(params, IDS, TINY, num_steps=3, max_steps=5, return_step_latents=True)
    assert plain.step_logits is None
    np.testing.assert_allclose(plain.step_latents, recorded.step_latents, atol=1e-6)
    none = rdlm.forward(params, IDS, TINY, num_steps=0, max_steps=5, return_step_latents=True)
    assert not jnp.any(none.step_latents)


def test_decode_positions_select_from_the_full_decode(params, recorded):
    per_row = rdlm.forward(params, IDS, TINY, num_steps=3, max_steps=5, return_step_latents=True, decode_steps=True,
                           decode_positions=np.array([[0, -1], [7, 2]]))  # negative: from the end
    assert per_row.step_logits.shape == (5, 2, 2, TINY.vocab_size)
    np.testing.assert_allclose(per_row.step_logits[:, 0], recorded.step_logits[:, 0, [0, 7]], atol=1e-5)
    np.testing.assert_allclose(per_row.step_logits[:, 1], recorded.step_logits[:, 1, [7, 2]], atol=1e-5)


def test_one_compile_serves_every_num_steps_up_to_max_steps(params):
    compiled = model.apply._cache_size()
    kw = dict(max_steps=4, return_step_latents=True, decode_steps=True, decode_positions=[-1])  # only this test's
    a = rdlm.forward(params, IDS, TINY, num_steps=2, **kw)
    b = rdlm.forward(params, IDS, TINY, num_steps=4, **kw)
    assert model.apply._cache_size() == compiled + 1
    np.testing.assert_allclose(a.step_logits[:2], b.step_logits[:2], atol=1e-5)
    assert not jnp.any(a.step_logits[2:]) and not np.allclose(a.step_logits[3], b.step_logits[3])


def test_traced_num_steps(params, recorded):
    """Inside jit, max_steps is required; a num_steps above it runs in full and records its first max_steps."""
    run = jax.jit(lambda n: rdlm.forward(params, IDS, TINY, num_steps=n, max_steps=4, return_step_latents=True))
    out = run(6)
    np.testing.assert_allclose(out.logits, rdlm.forward(params, IDS, TINY, num_steps=6), atol=2e-5)
    np.testing.assert_allclose(out.step_latents[:3], recorded.step_latents[:3], atol=1e-5)
    assert jnp.all(jnp.any(out.step_latents[3], -1)) and not np.allclose(out.step_latents[3], out.latent)
    with pytest.raises(ValueError, match="max_steps is required when num_steps is traced"):
        jax.jit(lambda n: rdlm.forward(params, IDS, TINY, num_steps=n, return_step_latents=True))(2)


def test_module_call_equals_the_functional_forward(params, recorded):
    ours = rdlm.Huginn.from_params(TINY, params)(IDS, 3, max_steps=5, return_step_latents=True, decode_steps=True)
    assert isinstance(ours, rdlm.StepLatents)
    for a, b in zip(ours, recorded):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_steps=2), "max_steps=2 is out of range; valid range is an int >= 3 (num_steps=3"),
    (dict(max_steps=0, num_steps=0), "max_steps=0 is out of range; valid range is an int >= 1"),
    (dict(max_steps=-1), "max_steps=-1 is out of range"),
    (dict(max_steps=4.0), "max_steps=4.0 is out of range"),
    (dict(max_steps=4, return_step_latents=False), "max_steps applies only with return_step_latents=True"),
    (dict(decode_steps=True, return_step_latents=False), "decode_steps applies only with return_step_latents=True"),
    (dict(decode_positions=[-1]), "decode_positions applies only with decode_steps=True"),
    (dict(decode_steps=True, decode_positions=[8]), "decode_positions [8] out of range; valid range is -8..7"),
    (dict(decode_steps=True, decode_positions=[-9]), "valid range is -8..7"),
    (dict(decode_steps=True, decode_positions=[0.5]), "decode_positions must be integer positions [k] or [batch=2, k]"),
    (dict(decode_steps=True, decode_positions=np.zeros((3, 1), int)), "[batch=2, k], k >= 1, got int32[3, 1]"),
    (dict(decode_steps=True, decode_positions=np.zeros(0, int)), "k >= 1"),
])
def test_bad_recording_arguments_are_named(params, kwargs, message):
    args = dict(num_steps=3, return_step_latents=True) | kwargs
    with pytest.raises(ValueError) as err:
        rdlm.forward(params, IDS, TINY, **args)
    assert message in str(err.value)
