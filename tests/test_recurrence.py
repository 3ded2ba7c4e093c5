"""Sampled recurrence and truncated backpropagation (the training forward)."""

import dataclasses
import functools
import math
import warnings
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdlm import model, recurrence, train
from rdlm.config import RECURRENCE_SCHEMES, ConfigError, load_config, parse_recurrence
from rdlm.params import init_params

TINY = load_config("tiny").model


# ---- sampled depth: every official scheme at t = 24, s = 8 ------------------------------------------

T, S = 24, 8
DEEP = dataclasses.replace(TINY, mean_recurrence=T + S, mean_backprop_depth=S)
DRAWS = 20000


@functools.partial(jax.jit, static_argnames=("cfg", "scheme"))
def _sample_many(keys: jax.Array, step: jax.Array, cfg, scheme: str) -> tuple[jax.Array, jax.Array]:
    return jax.vmap(lambda key: recurrence.sample_recurrence(key, cfg, scheme, step))(keys)


@functools.cache
def _draws(scheme: str, cfg=DEEP, step: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """DRAWS samples (n, k) at training step `step`; one compile per (cfg, scheme)."""
    n, k = _sample_many(jax.random.split(jax.random.key(0), DRAWS), jnp.int32(step), cfg, scheme)
    return np.asarray(n), np.asarray(k)


def _law(pmf: dict[int, float]) -> tuple[float, float]:
    """(mean, sd) of a finite pmf {value: probability}."""
    mean = sum(v * p for v, p in pmf.items())
    return mean, math.sqrt(sum((v - mean) ** 2 * p for v, p in pmf.items()))


def _uniform(a: int, b: int) -> tuple[float, float]:
    return _law({v: 1 / (b - a + 1) for v in range(a, b + 1)})


def _poisson(lam: float, cap: int | None = None) -> tuple[float, float]:
    """Poisson(lam), or min(Poisson(lam), cap)."""
    pmf: dict[int, float] = {}
    for j in range(10 * int(lam) + 50):
        value = j if cap is None else min(j, cap)
        pmf[value] = pmf.get(value, 0.0) + math.exp(j * math.log(lam) - lam - math.lgamma(j + 1))
    return _law(pmf)


def _lognormal_poisson(mean: float) -> tuple[float, float]:
    """Poisson(rate), rate log-normal with mean `mean` and sigma 1/2: var = mean + mean^2 (e^(1/4) - 1)."""
    return mean, math.sqrt(mean + mean**2 * math.expm1(0.25))


def _pair_law(pmf: dict[tuple[int, int], float]) -> tuple[tuple[float, float], tuple[float, float]]:
    """(mean, sd) of n and of k from the joint pmf {(n, k): probability}."""
    marginals: tuple[dict[int, float], dict[int, float]] = ({}, {})
    for pair, p in pmf.items():
        for marginal, value in zip(marginals, pair):
            marginal[value] = marginal.get(value, 0.0) + p
    return _law(marginals[0]), _law(marginals[1])


def _non_uniform_pmf() -> dict[tuple[int, int], float]:
    """m uniform in 0..2t-1, k uniform in 1..2 min(t, s), n = max(m - k, 0)."""
    pmf: dict[tuple[int, int], float] = {}
    for m in range(2 * T):
        for k in range(1, 2 * min(T, S) + 1):
            pmf[max(m - k, 0), k] = pmf.get((max(m - k, 0), k), 0.0) + 1 / (2 * T * 2 * min(T, S))
    return pmf


NON_UNIFORM = _pair_law(_non_uniform_pmf())
BPTT = _pair_law({(n, k): 1 / (2 * T) / min(2 * T - n, 2 * S)  # n uniform in 0..2t-1, k | n in 1..min(2t-n, 2s)
                  for n in range(2 * T) for k in range(1, min(2 * T - n, 2 * S) + 1)})
K_UNIFORM = ((1, 2 * S), _uniform(1, 2 * S))
# scheme -> {quantity: ((min, max) support, None: unbounded; (mean, sd) from the official formula)}
LAWS = {
    "poisson-lognormal-filling": {"n": ((0, None), None), "k": ((1, S), None),
                                  "n+k": ((1, None), (T + S + 1, _lognormal_poisson(T + S)[1]))},
    "poisson-lognormal": {"n": ((0, None), _lognormal_poisson(T)), "k": K_UNIFORM},
    "poisson-lognormal-fill": {"n": ((0, None), _lognormal_poisson(T)), "k": ((S, S), (S, 0))},
    "poisson-fill": {"n": ((0, None), _poisson(T)), "k": ((S, S), (S, 0))},
    "poisson-unbounded": {"n": ((0, None), _poisson(T)), "k": K_UNIFORM},
    "poisson-bounded": {"n": ((0, 2 * T - 1), _poisson(T, cap=2 * T - 1)), "k": K_UNIFORM},
    "negative-binomial": {"n": ((0, None), (T, math.sqrt(2 * T))), "k": K_UNIFORM},
    "simple": {"n": ((0, 2 * T - 1), _uniform(0, 2 * T - 1)), "k": K_UNIFORM},
    "non-uniform": {"n": ((0, 2 * T - 2), NON_UNIFORM[0]), "k": ((1, 2 * min(T, S)), NON_UNIFORM[1])},
    "bptt": {"n": ((0, 2 * T - 1), BPTT[0]), "k": ((1, 2 * S), BPTT[1])},
    "geometric": {"n": ((1, None), (T, math.sqrt(T * T - T))), "k": K_UNIFORM},
    "fixed": {"n": ((T, T), (T, 0)), "k": ((S, S), (S, 0))},
    "full": {"n": ((0, 0), (0, 0)), "k": K_UNIFORM},
    "non-recurrent": {"n": ((0, 0), (0, 0)), "k": ((1, 1), (1, 0))},
}


def test_every_official_scheme_has_a_sampler_and_a_law():
    assert set(recurrence.SAMPLERS) == set(RECURRENCE_SCHEMES) == set(LAWS)


@pytest.mark.filterwarnings("ignore:train.recurrence=poisson-lognormal:FutureWarning")
@pytest.mark.parametrize("scheme", list(LAWS))
def test_scheme_draws_follow_the_official_formula(scheme):
    """Support, mean (within 5 standard errors) and spread (10%) of n, k or n + k over 20000 draws."""
    n, k = _draws(scheme)
    assert n.dtype == k.dtype == np.int32 and n.shape == k.shape == (DRAWS,)
    for quantity, ((lo, hi), moments) in LAWS[scheme].items():
        x = {"n": n, "k": k, "n+k": n + k}[quantity]
        assert x.min() >= lo and (hi is None or x.max() <= hi), (quantity, x.min(), x.max())
        if moments is not None:
            mean, sd = moments
            assert abs(x.mean() - mean) <= 5 * sd / math.sqrt(DRAWS), (quantity, x.mean(), mean)
            assert x.std() == pytest.approx(sd, rel=0.1, abs=1e-9), (quantity, x.std(), sd)


def test_filling_runs_the_last_s_of_p_with_gradient():
    """huginn-0125's scheme: k = min(s, p), n = max(p - s, 0) for the total p = n + k."""
    n, k = _draws("poisson-lognormal-filling")
    np.testing.assert_array_equal(k, np.minimum(S, n + k))
    np.testing.assert_array_equal(n, np.maximum(n + k - S, 0))


def test_sampler_is_a_function_of_the_seed_and_step():
    assert recurrence.sample_recurrence(jax.random.key(5), TINY, "fixed") == (4, 4)
    rng = jax.random.key_data(jax.random.key(0))
    depths = [tuple(map(int, train._sample(rng, jnp.int32(step), DEEP, "poisson-lognormal-filling")))
              for step in range(8)]
    assert depths == [tuple(map(int, train._sample(rng, jnp.int32(step), DEEP, "poisson-lognormal-filling")))
                      for step in range(8)]  # a resumed run replays the same depths
    assert len(set(depths)) > 1


def _ramp(step: int, ramp: int) -> tuple[int, int]:
    """The official curriculum's (t, s) at its 1-based step counter `step + 1`."""
    done = min(Fraction(step + 1, ramp), 1)
    return math.ceil(done * T), max(math.ceil(done * S), 1)


def test_curriculum_ramps_t_and_s_with_the_traced_step():
    rng = jax.random.key_data(jax.random.key(0))
    compiled = train._sample._cache_size()
    got = [tuple(map(int, train._sample(rng, jnp.int32(step), DEEP, "fixed-curriculum-10"))) for step in range(13)]
    assert got == [_ramp(step, 10) for step in range(13)]
    assert got[0] == (3, 1) and got[9:] == [(T, S)] * 4
    assert train._sample._cache_size() == compiled + 1  # the step is traced: one compile for every step


def test_curriculum_scales_a_random_scheme():
    """poisson-fill-curriculum-100 at step 9 draws Poisson(ceil(0.1 t)) with k = 1; past the ramp, poisson-fill."""
    t, s = _ramp(9, 100)
    n, k = _draws("poisson-fill-curriculum-100", step=9)
    assert abs(n.mean() - t) <= 5 * math.sqrt(t / DRAWS) and set(k) == {s}
    n, k = _draws("poisson-fill-curriculum-100", step=500)
    assert abs(n.mean() - T) <= 5 * math.sqrt(T / DRAWS) and set(k) == {S}


def test_scheme_names_are_exact_with_an_optional_curriculum():
    assert parse_recurrence("poisson-lognormal-filling") == ("poisson-lognormal-filling", None)
    assert parse_recurrence("poisson-lognormal-filling-curriculum-5000") == ("poisson-lognormal-filling", 5000)
    assert all(load_config(p).train.recurrence == "poisson-lognormal-filling" for p in ("tiny", "demo", "huginn_0125"))
    for bad in ("uniform", "poisson", "lognormal", "poisson-lognormal-fillin", "curriculum-100",
                "poisson-fill-curriculum-0", "poisson-fill-curriculum-", "poisson-fill-curriculum-1e3"):
        with pytest.raises(ConfigError, match="train.recurrence") as err:
            load_config("tiny", [f"train.recurrence={bad}"])
        assert all(name in str(err.value) for name in RECURRENCE_SCHEMES) and "-curriculum-N" in str(err.value)


def test_schemes_that_need_t_refuse_mean_recurrence_at_most_backprop_depth():
    shallow = load_config("tiny", ["model.mean_recurrence=4", "train.recurrence=simple"])
    with pytest.raises(ConfigError, match="train.recurrence=simple needs model.mean_recurrence=4 above "
                                          "model.mean_backprop_depth=4"):
        shallow.check_trainable()
    with pytest.raises(ConfigError, match="train.recurrence=simple"):
        recurrence.sample_recurrence(jax.random.key(0), shallow.model, "simple")
    n, k = _draws("poisson-lognormal-filling", cfg=shallow.model)  # t = 0 is fine here: p = Poisson + 1
    assert n.min() >= 0 and 1 <= k.min() <= k.max() <= 4


def test_old_poisson_lognormal_name_warns_that_it_is_now_the_official_scheme():
    def trace(scheme):  # the warning comes while tracing, once per compile of the train loop's sampler
        return jax.eval_shape(lambda: recurrence.sample_recurrence(jax.random.key(0), DEEP, scheme))

    with pytest.warns(FutureWarning, match="poisson-lognormal now samples the official.*poisson-lognormal-filling"):
        trace("poisson-lognormal")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace("poisson-lognormal-filling")
        trace("poisson-lognormal-curriculum-100")  # not an old rdlm name: the official scheme, no warning


# ---- truncated backpropagation ---------------------------------------------------------------------


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
