import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
from rdlm import model
from rdlm.config import load_config
from conftest import rel_l2

TINY = load_config("tiny").model


@pytest.fixture(scope="module")
def tiny_params():
    return rdlm.init_params(TINY, jax.random.key(0))


@pytest.mark.parametrize("num_steps", [1, 4, 32])
@pytest.mark.parametrize("start", ["zero", "state"])
def test_parity_with_official_logits(official, num_steps, start):
    """fp32 forward against the official logits (bf16 fixture: weights upcast to fp32 on both sides)."""
    path, expected = official
    cfg, params = rdlm.load_hf_checkpoint(path, dtype=jnp.float32)
    kwargs = {"init_scale": 0.0} if start == "zero" else {"init_state": jnp.asarray(expected["input_states"])}
    logits = rdlm.forward(params, expected["input_ids"], cfg, num_steps=num_steps, **kwargs)
    theirs = expected[f"logits_{start}_{num_steps}"]
    assert logits.dtype == jnp.float32 and logits.shape == theirs.shape
    assert rel_l2(logits, theirs) <= 1e-5
    assert (np.argmax(logits, -1) == np.argmax(theirs, -1)).mean() >= 0.999


def test_latents_match_official(official):
    path, expected = official
    cfg, params = rdlm.load_hf_checkpoint(path, dtype=jnp.float32)
    _, latents = rdlm.forward(params, expected["input_ids"], cfg, num_steps=4, init_scale=0.0, return_latents=True)
    assert rel_l2(latents, expected["latents_zero_4"]) <= 1e-5


def test_one_compile_serves_every_num_steps(tiny_params):
    ids = jnp.zeros((2, 8), jnp.int32)
    model.apply.clear_cache()
    a = rdlm.forward(tiny_params, ids, TINY, num_steps=1)
    b = rdlm.forward(tiny_params, ids, TINY, num_steps=64)
    assert model.apply._cache_size() == 1
    assert not np.allclose(a, b)


def test_initial_state_follows_official_init(tiny_params):
    ids = jnp.zeros((1, 16), jnp.int32)
    zero = rdlm.forward(tiny_params, ids, TINY, num_steps=3, init_scale=0.0)
    given = rdlm.forward(tiny_params, ids, TINY, num_steps=3, init_state=jnp.zeros((1, 16, TINY.n_embd)))
    np.testing.assert_array_equal(zero, given)
    same = [rdlm.forward(tiny_params, ids, TINY, num_steps=3, rng=jax.random.key(7)) for _ in range(2)]
    np.testing.assert_array_equal(*same)
    assert not np.allclose(same[0], rdlm.forward(tiny_params, ids, TINY, num_steps=3, rng=jax.random.key(8)))
    state = model.initial_state(jax.random.key(1), (64, 64, TINY.n_embd), TINY, jnp.float32(1.0))
    bound = 3 * TINY.init_std * TINY.embed_scale
    assert float(jnp.abs(state).max()) <= bound * (1 + 1e-6)
    # std of a normal truncated at +-3 sigma is 0.9866 sigma
    assert float(state.std()) == pytest.approx(0.9866 * TINY.init_std * TINY.embed_scale, rel=0.02)


def test_packed_segments_equal_separate_documents(tiny_params):
    """Two documents packed in one row (segment ids, positions restarting) give their separate logits."""
    a, b = jnp.arange(5)[None] + 3, jnp.arange(7)[None] + 40
    packed = jnp.concatenate([a, b], 1)
    positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None]
    segments = jnp.array([[1] * 5 + [2] * 7])
    kw = dict(num_steps=4, init_scale=0.0)
    out = rdlm.forward(tiny_params, packed, TINY, positions=positions, segment_ids=segments, **kw)
    np.testing.assert_allclose(out[:, :5], rdlm.forward(tiny_params, a, TINY, **kw), atol=2e-5)
    np.testing.assert_allclose(out[:, 5:], rdlm.forward(tiny_params, b, TINY, **kw), atol=2e-5)


def test_causal(tiny_params):
    ids = jax.random.randint(jax.random.key(3), (1, 10), 0, TINY.vocab_size)
    full = rdlm.forward(tiny_params, ids, TINY, num_steps=2, init_scale=0.0)
    prefix = rdlm.forward(tiny_params, ids[:, :6], TINY, num_steps=2, init_scale=0.0)
    np.testing.assert_allclose(full[:, :6], prefix, atol=2e-5)


def test_bf16_compute_tracks_fp32(official):
    path, expected = official
    cfg, params = rdlm.load_hf_checkpoint(path)
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    logits = rdlm.forward(params, expected["input_ids"], bf16, num_steps=4, init_scale=0.0)
    assert logits.dtype == jnp.float32
    assert rel_l2(logits, expected["logits_zero_4"]) < 0.05


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=np.zeros((2, 4), np.float32)), "input_ids must be an integer array"),
    (dict(input_ids=np.zeros((4,), np.int32)), "input_ids must be an integer array"),
    (dict(input_ids=np.zeros((1, 33), np.int32)), "33 positions; valid range is 1..block_size=32"),
    (dict(num_steps=-1), "num_steps=-1 must be >= 0"),
    (dict(init_state=np.zeros((2, 4, 8), np.float32)), "expected (2, 4, 32) [batch, seq, n_embd]"),
])
def test_bad_input_is_named(tiny_params, kwargs, message):
    args = dict(input_ids=np.zeros((2, 4), np.int32), num_steps=2) | kwargs
    ids = args.pop("input_ids")
    with pytest.raises(ValueError) as err:
        rdlm.forward(tiny_params, ids, TINY, **args)
    assert message in str(err.value)
