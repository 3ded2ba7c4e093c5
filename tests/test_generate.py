"""Cached generation: equality with uncached recomputation, batching, exits, cache strategies, speculative
decoding, sampling filters and bad input. Parity with the official generate is in test_generate_parity.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
from rdlm import model
from rdlm.inference import (CRITERIA, GenerateError, Sampling, cache_bytes, cache_slots, generate, init_cache,
                            sample_token)
from conftest import FIXTURES

STEPS, NEW = 6, 8


@pytest.fixture(scope="module")
def tiny():
    return rdlm.load_hf_checkpoint(FIXTURES / "tiny_fp32", dtype=jnp.float32)


PROMPTS = [np.array([5, 17, 200, 3, 99, 41, 7, 8, 9]), np.array([60, 61, 62, 63]), np.array([11])]


def recompute_greedy(params, cfg, prompt, n, steps):
    """Greedy decoding by re-running the full uncached forward on the growing sequence (right-padded to one
    shape: causal attention keeps the padding out of the real positions)."""
    ids = list(prompt)
    for _ in range(n):
        padded = jnp.asarray([ids + [0] * (cfg.block_size - len(ids))])
        logits = model.forward(params, padded, cfg, num_steps=steps, init_scale=0.0)
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_cached_greedy_equals_uncached_recompute_in_a_ragged_batch(tiny):
    cfg, params = tiny
    out = generate(params, PROMPTS, cfg, max_new_tokens=NEW, num_steps=STEPS, init_scale=0.0)
    assert out.tokens.shape == (3, NEW) and (out.lengths == NEW).all() and (out.steps == STEPS).all()
    for row, prompt in zip(out.tokens, PROMPTS):
        assert row.tolist() == recompute_greedy(params, cfg, prompt, NEW, STEPS)


def test_padded_array_input_equals_list_input(tiny):
    cfg, params = tiny
    padded = np.zeros((3, 9), np.int32)
    for i, p in enumerate(PROMPTS):
        padded[i, :len(p)] = p
    a = generate(params, padded, cfg, prompt_lengths=[len(p) for p in PROMPTS], max_new_tokens=NEW, num_steps=STEPS,
                 init_scale=0.0)
    b = generate(params, PROMPTS, cfg, max_new_tokens=NEW, num_steps=STEPS, init_scale=0.0)
    np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("criterion,strategy", [("entropy-diff", "full"), ("kl", "latest-m4"),
                                                ("latent-diff", "always-last-m4"), ("argmax-stability", "compress-s8")])
def test_batched_adaptive_exit_equals_each_row_alone(tiny, criterion, strategy):
    """Rows exit on their own inside one while_loop: same tokens and steps as running each row alone."""
    cfg, params = tiny
    thr = {"entropy-diff": 0.01, "kl": 0.01, "latent-diff": 0.2, "argmax-stability": 2}[criterion]
    kw = dict(max_new_tokens=NEW, num_steps=STEPS, init_scale=0.0, exit_criterion=criterion, exit_threshold=thr,
              cache_strategy=strategy)
    batch = generate(params, PROMPTS, cfg, **kw)
    assert 1 <= batch.steps.min() and batch.steps.max() <= STEPS
    assert len(np.unique(batch.steps)) > 1, "the exit never varied: the test would not exercise anything"
    for i, prompt in enumerate(PROMPTS):
        alone = generate(params, [prompt], cfg, **kw)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])
        np.testing.assert_array_equal(alone.steps[0], batch.steps[i])


def test_strategies_agree_when_no_token_exits_early(tiny):
    cfg, params = tiny
    kw = dict(max_new_tokens=NEW, num_steps=STEPS, init_scale=0.0)
    full = generate(params, PROMPTS[:2], cfg, **kw).tokens
    for strategy in ["latest-m4", "always-last-m4", f"compress-s{4 * STEPS}", "compress-anchor"]:  # distinct lookups
        np.testing.assert_array_equal(generate(params, PROMPTS[:2], cfg, cache_strategy=strategy, **kw).tokens, full)


def test_cache_memory_per_strategy(tiny):
    cfg, _ = tiny
    full = cache_bytes(cfg, 1, 64, 32, "full")
    assert cache_bytes(cfg, 1, 64, 32, "latest-m4") == full
    assert cache_bytes(cfg, 1, 64, 32, "compress-s4") < cache_bytes(cfg, 1, 64, 32, "compress-anchor") < full
    per_layer = 64 * 2 * cfg.n_embd * 4  # one layer: length x (k, v) x width x fp32
    assert full == (cfg.n_layers_in_prelude + 32 * 4 + cfg.n_layers_in_coda) * per_layer + 64 * 4 + 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("strategy", ["full", "compress-s8", "compress-anchor"])
def test_cache_bytes_is_what_init_cache_allocates(tiny, strategy, dtype):
    """`cache_bytes` is a formula (the memory check evaluates it many times): it must stay `init_cache`'s size."""
    cfg = dataclasses.replace(tiny[0], dtype=dtype)
    shapes = jax.eval_shape(lambda: init_cache(cfg, 3, 40, cache_slots(strategy, 12, cfg)))
    assert cache_bytes(cfg, 3, 40, 12, strategy) == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("draft_steps,lookahead", [(1, 3), (2, 4), (STEPS, 5)])
def test_speculative_equals_greedy(tiny, draft_steps, lookahead):
    cfg, params = tiny
    kw = dict(max_new_tokens=NEW, num_steps=STEPS, init_scale=0.0)
    greedy = generate(params, PROMPTS, cfg, **kw)
    spec = generate(params, PROMPTS, cfg, draft_steps=draft_steps, lookahead=lookahead, **kw)
    np.testing.assert_array_equal(spec.tokens, greedy.tokens)
    # verified entries are complete, so strategies that substitute missing entries must change nothing
    last = generate(params, PROMPTS, cfg, draft_steps=draft_steps, lookahead=lookahead, cache_strategy="always-last-m4",
                    **kw | dict(init_scale=1.0))
    np.testing.assert_array_equal(last.tokens, generate(params, PROMPTS, cfg, draft_steps=draft_steps,
                                                         lookahead=lookahead, **kw | dict(init_scale=1.0)).tokens)
    if draft_steps == STEPS:  # drafts at full depth always verify: one pass per lookahead tokens
        assert spec.verify_passes == -(-(NEW - 1) // lookahead)


def test_stop_tokens_end_each_row(tiny):
    cfg, params = tiny
    kw = dict(max_new_tokens=NEW, num_steps=STEPS, init_scale=0.0)
    free = generate(params, PROMPTS, cfg, **kw).tokens
    stop = int(free[0, 2])
    for extra in [{}, {"draft_steps": 2}]:
        out = generate(params, PROMPTS, cfg, stop_ids=[stop], **kw, **extra)
        for i in range(3):
            hits = np.flatnonzero(free[i] == stop)
            n = hits[0] + 1 if len(hits) else NEW
            assert out.lengths[i] == n
            np.testing.assert_array_equal(out.tokens[i, :n], free[i, :n])
            assert (out.tokens[i, n:] == -1).all() and (out.steps[i, n:] == 0).all()


def test_continuous_thought_changes_the_computation_and_is_reproducible(tiny):
    cfg, params = tiny
    kw = dict(max_new_tokens=NEW, num_steps=STEPS, init_scale=0.0, exit_criterion="entropy-diff")
    warm = generate(params, PROMPTS, cfg, continuous=True, **kw)
    np.testing.assert_array_equal(warm.tokens, generate(params, PROMPTS, cfg, continuous=True, **kw).tokens)
    cold = generate(params, PROMPTS, cfg, **kw)
    assert (warm.steps != cold.steps).any() or (warm.tokens != cold.tokens).any()


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.06, 0.04]] * 4000))
    def draw(**kw):
        return np.asarray(sample_token(logits, jax.random.key(0), Sampling(
            jnp.float32(kw.get("t", 1.0)), jnp.int32(kw.get("k", 0)), jnp.float32(kw.get("p", 1.0)),
            jnp.float32(kw.get("m", 0.0))), True))
    assert set(np.unique(draw())) == {0, 1, 2, 3, 4}
    assert set(np.unique(draw(k=2))) == {0, 1}
    assert set(np.unique(draw(p=0.75))) == {0, 1}  # the official drops the token that crosses top_p
    assert set(np.unique(draw(m=0.4))) == {0, 1, 2}  # keeps p >= 0.4 x max
    assert set(np.unique(draw(t=1e-3))) == {0}
    freq = np.bincount(draw(), minlength=5) / 4000
    np.testing.assert_allclose(freq, [0.4, 0.3, 0.2, 0.06, 0.04], atol=0.03)


def test_sampled_generation_is_seeded(tiny):
    cfg, params = tiny
    kw = dict(max_new_tokens=NEW, num_steps=STEPS, temperature=1.0, top_k=50)
    a = generate(params, PROMPTS, cfg, rng=jax.random.key(1), **kw).tokens
    np.testing.assert_array_equal(a, generate(params, PROMPTS, cfg, rng=jax.random.key(1), **kw).tokens)
    assert (a != generate(params, PROMPTS, cfg, rng=jax.random.key(2), **kw).tokens).any()


@pytest.mark.parametrize("kwargs,message", [
    (dict(input_ids=[[]]), "empty prompt"),
    (dict(input_ids=[list(range(30))], max_new_tokens=3), "exceeds the context block_size=32"),
    (dict(num_steps=0), "num_steps=0 is out of range; valid range is [1, 2147483647]"),
    (dict(num_steps=2.5), "num_steps=2.5 must be an integer"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(input_ids=np.ones((2, 3), np.int32), prompt_lengths=[3, -1]), "must be 2 integers in [1, 3]"),
    (dict(init_scale=float("nan")), "init_scale=nan is not a finite number; valid range is [0.0, 1000000.0]"),
    (dict(rng=3), "rng must be a key from jax.random.key(seed)"),
    (dict(stop_ids=[256]), "stop_ids [256] must lie in [0, vocab_size=256)"),
    (dict(exit_criterion="argmax-stability", exit_threshold=float("inf")),
     "argmax-stability=inf is not a finite number"),
    (dict(exit_criterion="entropy"), "unknown exit_criterion='entropy'; valid: entropy-diff"),
    (dict(exit_criterion="cosine", exit_threshold=3.0),
     "exit_threshold for cosine=3.0 is out of range; valid range is (0.0, 2.0]"),
    (dict(exit_criterion="kl", exit_threshold=-1.0), "exit_threshold for kl=-1.0 is out of range"),
    (dict(exit_criterion="argmax-stability", exit_threshold=2.5), "must be an integer"),
    (dict(exit_threshold=0.1), "exit_threshold was given without an exit_criterion"),
    (dict(cache_strategy="latest"), "unknown cache_strategy='latest'"),
    (dict(cache_strategy="compress-s6"), "positive multiple of the core depth 4"),
    (dict(top_p=0.0), "top_p=0.0 is out of range"),
    (dict(input_ids=[[300]]), "outside [0, vocab_size=256)"),
    (dict(draft_steps=9), "draft_steps=9 is out of range; valid range is [1, 4]"),
    (dict(draft_steps=2, lookahead=2.5), "lookahead=2.5 must be an integer"),
    (dict(draft_steps=2, continuous=True), "does not combine"),
])
def test_bad_input_is_named(tiny, kwargs, message):
    cfg, params = tiny
    call = dict(input_ids=[[1, 2, 3]], max_new_tokens=2, num_steps=4) | kwargs
    with pytest.raises(GenerateError) as e:
        generate(params, call.pop("input_ids"), cfg, **call)
    assert message in str(e.value)


def test_default_thresholds_are_the_official_ones():
    assert {k: c.default for k, c in CRITERIA.items() if k != "none"} == {
        "entropy-diff": 1e-3, "latent-diff": 0.03, "kl": 1e-3, "minp-kl": 1e-5, "argmax-stability": 5, "cosine": 1e-3}


def test_core_lookup_rules():
    """Which recurrence slot each past position is read from at step t=3 (positions ran 1, 3, 4 and 6 steps;
    a fifth slot beyond the row's length holds a stale count and must be ignored)."""
    from rdlm.inference.cache import core_lookup
    steps = jnp.asarray([[1, 3, 4, 6, 2]])
    past = jnp.asarray([[True, True, True, True, False]])
    t = jnp.int32(3)

    def check(strategy, slots, slot, exists, steps=steps, past=past):
        read, present = core_lookup(strategy, t, steps, past, slots)
        n = len(slot)
        np.testing.assert_array_equal(np.broadcast_to(read, steps.shape)[:, :n], [slot])
        np.testing.assert_array_equal(present[:, :n], [exists])

    check("full", 8, [3, 3, 3, 3], [False, False, True, True])  # only positions that ran step 3
    check("latest-m4", 8, [0, 2, 3, 3], [True] * 4)  # newest entry at or before step 3
    check("always-last-m4", 8, [0, 2, 3, 5], [True] * 4)  # deepest entry (some position lacks step 3)
    check("compress-s8", 2, [1, 1, 1, 1], [False, True, True, True])  # slot t % 2, written by steps 1, 3, 5
    check("compress-anchor", 9, [3, 3, 3, 3], [False, False, True, True])
    # nothing missing below the length (the stale 2 does not count): always-last reads step t like full
    check("always-last-m4", 8, [3, 3], [True, True], steps=jnp.asarray([[6, 6, 2]]),
          past=jnp.asarray([[True, True, False]]))


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (1, 2, 2)])
def test_sharded_generation_equals_single_device(tiny, mesh_shape):
    """Parameters, cache and activations sharded over 8 virtual devices: same tokens and steps."""
    from rdlm.config import MeshConfig
    from rdlm.sharding import make_mesh
    cfg, params = tiny
    data, fsdp, tensor = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:data * fsdp * tensor])
    for kw in [dict(exit_criterion="entropy-diff", exit_threshold=0.01, cache_strategy="latest-m4"),
               dict(draft_steps=2, cache_strategy="always-last-m4")]:
        kw |= dict(max_new_tokens=NEW, num_steps=STEPS, init_scale=0.0)
        alone = generate(params, PROMPTS[:2], cfg, **kw)
        sharded = generate(params, PROMPTS[:2], cfg, mesh=mesh, **kw)
        np.testing.assert_array_equal(sharded.tokens, alone.tokens)
        np.testing.assert_array_equal(sharded.steps, alone.steps)


def test_load_checkpoint_holds_weights_in_the_compute_dtype():
    """Weights wider than model.dtype are narrowed to it and, on CPU, narrower ones widened (XLA:CPU would keep
    fp32 copies of bf16 weights); either way no logit changes, as every use casts a weight to model.dtype."""
    from rdlm.inference import load_checkpoint

    config, params = load_checkpoint(FIXTURES / "tiny_bf16_sharded")  # bf16 weights, an fp32 model
    held = np.dtype("float32") if jax.default_backend() == "cpu" else jnp.dtype("bfloat16")  # widened on CPU only
    assert config.model.dtype == "float32" and {x.dtype for x in jax.tree.leaves(params)} == {held}
    config16, params16 = load_checkpoint(FIXTURES / "tiny_bf16_sharded", ["model.dtype=bfloat16"])
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype("bfloat16")}
    _, narrowed = load_checkpoint(FIXTURES / "tiny_fp32", ["model.dtype=bfloat16"])
    assert {x.dtype for x in jax.tree.leaves(narrowed)} == {jnp.dtype("bfloat16")}
    ids = np.arange(1, 9)[None] % config.model.vocab_size
    as_stored = rdlm.forward(params16, ids, config16.model, num_steps=3, init_scale=0.0)
    widened = rdlm.forward(params, ids, config16.model, num_steps=3, init_scale=0.0)
    np.testing.assert_array_equal(np.asarray(as_stored), np.asarray(widened))
    _, fp32 = load_checkpoint(FIXTURES / "tiny_fp32")
    np.testing.assert_array_equal(np.asarray(rdlm.forward(fp32, ids, config16.model, num_steps=3, init_scale=0.0)),
                                  np.asarray(rdlm.forward(narrowed, ids, config16.model, num_steps=3, init_scale=0.0)))
