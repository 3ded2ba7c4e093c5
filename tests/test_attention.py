"""Attention implementations against the `xla` reference: outputs and gradients, causal with packed segments,
lengths that are and are not multiples of the blocks; `splash` in Pallas interpret mode (CPU), also in
shard_map under a mesh; official parity through each; the `auto` choice."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
from rdlm import attention, model
from rdlm.config import MeshConfig, RulesConfig
from rdlm.sharding import activate, make_mesh
from conftest import rel_l2


def inputs(T: int, b: int = 2, n: int = 4, d: int = 16, dtype=jnp.float32):
    """q, k, v and three packed documents per row (positions restart at each), different per row."""
    q, k, v = (jax.random.normal(key, (b, T, n, d), dtype) for key in jax.random.split(jax.random.key(T), 3))
    cuts = [[T // 3, T // 2], [T // 4, 3 * T // 4]][:b]
    seg = np.stack([np.searchsorted(c, np.arange(T), side="right") for c in cuts])
    pos = np.stack([np.arange(T) - np.asarray([0, *c])[s] for c, s in zip(cuts, seg)])
    return q, k, v, jnp.asarray(pos), jnp.asarray(seg)


def loss(impl, q, k, v, pos, seg):
    return (attention.causal_attention(q, k, v, pos, seg, impl).astype(jnp.float32) * jnp.cos(v)).sum()


@pytest.mark.parametrize("impl", ["chunked", "splash"])
@pytest.mark.parametrize("T", [37, 128, 300])
def test_equals_xla_with_gradients(impl, T, monkeypatch):
    monkeypatch.setattr(attention, "CHUNK", 64)  # several query and key blocks, a ragged last one
    q, k, v, pos, seg = inputs(T)
    ref = attention.causal_attention(q, k, v, pos, seg, "xla")
    out = attention.causal_attention(q, k, v, pos, seg, impl)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    grads = jax.grad(loss, argnums=(1, 2, 3))(impl, q, k, v, pos, seg)
    expected = jax.grad(loss, argnums=(1, 2, 3))("xla", q, k, v, pos, seg)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "splash"])
def test_bf16_tracks_xla(impl, monkeypatch):
    monkeypatch.setattr(attention, "CHUNK", 64)
    q, k, v, pos, seg = inputs(200, dtype=jnp.bfloat16)
    ref = attention.causal_attention(q, k, v, pos, seg, "xla").astype(jnp.float32)
    assert rel_l2(attention.causal_attention(q, k, v, pos, seg, impl).astype(jnp.float32), ref) < 1e-2


def test_splash_in_shard_map_under_a_mesh():
    """Batch over data, heads over tensor: the kernel runs per device and gives the single-device result."""
    q, k, v, pos, seg = inputs(130)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4), jax.devices()[:8])
    expected = attention.causal_attention(q, k, v, pos, seg, "xla")

    def run(q, k, v):
        with activate(mesh, RulesConfig()):
            return attention.causal_attention(q, k, v, pos, seg, "splash")

    np.testing.assert_allclose(jax.jit(run)(q, k, v), expected, atol=2e-6)
    assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v))


def test_fused_masks_as_xla():
    """`cudnn` is `jax.nn.dot_product_attention` with our causal and segment masks: checked through its XLA
    implementation here (cudnn itself needs an NVIDIA GPU)."""
    q, k, v, pos, seg = inputs(40)
    expected = attention.causal_attention(q, k, v, pos, seg, "xla")
    np.testing.assert_allclose(attention.fused(q, k, v, seg, "xla"), expected, atol=2e-6)


@pytest.mark.parametrize("impl", ["chunked", "splash"])
def test_official_parity_through_each(official, impl, monkeypatch):
    monkeypatch.setattr(attention, "CHUNK", 4)  # 12 positions: three blocks
    path, expected = official
    cfg, params = rdlm.load_hf_checkpoint(path, dtype=jnp.float32)
    cfg = dataclasses.replace(cfg, attention=impl)
    ids = jnp.asarray(expected["input_ids"])
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    run = jax.jit(lambda p: model.merge(p, cfg).apply(ids, 4, None, 0.0, jax.random.key(0), pos, None)[0])
    assert rel_l2(run(params), expected["logits_zero_4"]) <= 1e-5


def test_auto_by_backend_length_and_dtype(monkeypatch):
    bf16, fp32 = jnp.bfloat16, jnp.float32
    assert attention.resolve("auto", 512, bf16) == "xla" and attention.resolve("auto", 4096, fp32) == "chunked"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attention.resolve("auto", 512, fp32) == "splash"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.resolve("auto", 512, bf16) == "cudnn" and attention.resolve("chunked", 512, bf16) == "chunked"
    assert attention.resolve("auto", 512, fp32) == "xla"  # cudnn's fused attention takes 16-bit inputs only


def test_chunked_memory_does_not_grow_with_the_square():
    """Temporaries of the chunked backward at 4x the length grow far less than the 16x of full scores."""
    def temp(impl, T):
        q, k, v, pos, seg = inputs(T, b=1, n=2, d=8)
        grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
        return grad.lower(impl, q, k, v, pos, seg).compile().memory_analysis().temp_size_in_bytes
    assert temp("xla", 4096) / temp("xla", 1024) > 8
    assert temp("chunked", 4096) / temp("chunked", 1024) < 3


@pytest.mark.parametrize("filled, T", [(250, 300), (300, 300), (5, 300)])
def test_decode_reads_only_the_filled_blocks(filled, T):
    """Cached attention of 2 new tokens equals a dense softmax over (each row's cached positions, the new
    tokens), reading 64 positions at a time up to the longest row: entries past the last filled block are
    NaN here, and never read (300 is no multiple of 64: the last block overlaps the one before)."""
    from rdlm.inference.cache import _attend_cached

    b, L, n, d, C = 2, 2, 4, 16, 64
    q, k, v = (jax.random.normal(key, (b, L, n, d)) for key in jax.random.split(jax.random.key(0), 3))
    past = jax.random.normal(jax.random.key(1), (b, T, 2, n, d))
    lengths = jnp.asarray([filled, min(37, filled)])
    past_mask = jnp.arange(T)[None] < lengths[:, None]
    read_to = min(-(-filled // C) * C, T)
    poisoned = past.at[:, read_to:].set(jnp.nan)
    new_mask = jnp.tril(jnp.ones((L, L), bool))[None, None]
    out = _attend_cached(q, k, v, new_mask, lambda start, size: jax.lax.dynamic_slice_in_dim(poisoned, start, size, 1),
                         past_mask, jnp.max(lengths), C)
    mask = jnp.concatenate([jnp.broadcast_to(past_mask[:, None, None, :], (b, 1, L, T)),
                            jnp.broadcast_to(new_mask, (b, 1, L, L))], axis=-1)
    ref = attention.attend(q, jnp.concatenate([past[:, :, 0], k], 1), jnp.concatenate([past[:, :, 1], v], 1), mask)
    np.testing.assert_allclose(out, ref, atol=2e-6)
