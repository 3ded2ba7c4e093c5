import json

import jax
import jax.numpy as jnp
import pytest

from rdlm import model
from rdlm.config import load_config
from rdlm.flops import forward_flops_per_token
from rdlm.params import abstract_params


def test_flops_agree_with_xla_cost_analysis():
    """Our analytic count against XLA's count of the compiled forward, one recurrence unrolled."""
    cfg = load_config("tiny", ["model.n_embd=128", "model.intermediate_size=256", "model.vocab_size=512",
                               "model.block_size=64"]).model
    batch, seq = 2, 64
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    pos = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def one_step(params, ids, pos):
        mix = model.causal_mixer(model.rope_angles(pos, cfg.head_dim, cfg.rope_base), pos, None, "xla")
        m = model.merge(params, cfg)
        e, _ = m.run(m.prelude, m.embed(ids), mix)
        return m.readout(m.core_step(jnp.zeros_like(e), e, mix)[0], mix)[:2]
    compiled = jax.jit(one_step).lower(abstract_params(cfg), ids, pos).compile()
    xla = compiled.cost_analysis()["flops"]
    ours = forward_flops_per_token(cfg, 1, seq) * batch * seq
    assert xla == pytest.approx(ours, rel=0.1)


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """peak_flops() with a fake measurement (set `measured[0]`) and its cache under a temporary XDG_CACHE_HOME."""
    from rdlm import flops

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    figure = [0.0]
    monkeypatch.setattr(flops, "measured_matmul_flops", lambda: figure[0])
    return figure


def test_cpu_peak_is_the_best_measurement_of_this_host(measured, tmp_path):
    """A measurement under load (low) does not lower the peak: the best one is cached per host."""
    from rdlm.flops import peak_cache_file, peak_flops

    measured[0] = 2e11
    assert peak_flops() == (2e11, "measured fp32 matmul on cpu")
    assert peak_cache_file() == tmp_path / "cache/rdlm/peak_flops.json"
    measured[0] = 5e10  # a busy machine
    peak, source = peak_flops()
    assert peak == 2e11 and "best on this host" in source
    measured[0] = 3e11
    assert peak_flops()[0] == 3e11
    assert list(json.loads(peak_cache_file().read_text()).values()) == [3e11]


def test_peak_override_and_unusable_cache(measured, monkeypatch, tmp_path):
    from rdlm.config import ConfigError
    from rdlm.flops import PEAK_ENV, peak_cache_file, peak_flops

    measured[0] = 1e11
    (tmp_path / "cache").write_text("a file where the cache directory would be")
    assert peak_flops()[0] == 1e11  # nothing cached, nothing raised
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
    peak_cache_file().parent.mkdir(parents=True)
    peak_cache_file().write_text("{not json")
    assert peak_flops()[0] == 1e11 and json.loads(peak_cache_file().read_text())  # replaced by a valid one
    monkeypatch.setenv(PEAK_ENV, "4.5e11")
    assert peak_flops() == (4.5e11, PEAK_ENV)
    for bad in ("fast", "0", "-1e9", "nan", "inf"):
        monkeypatch.setenv(PEAK_ENV, bad)
        with pytest.raises(ConfigError, match=rf"{PEAK_ENV}='{bad}' is not a positive number of FLOP/s"):
            peak_flops()
