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
        rope, mask = model.rope_angles(pos, cfg.head_dim, cfg.rope_base), model.attention_mask(pos, None)
        e = model.run_blocks(params["prelude"], model.embed(params, ids, cfg), rope, mask, cfg)
        return model.decode(params, model.core_step(params, jnp.zeros_like(e), e, rope, mask, cfg), rope, mask, cfg)
    compiled = jax.jit(one_step).lower(abstract_params(cfg), ids, pos).compile()
    xla = compiled.cost_analysis()["flops"]
    ours = forward_flops_per_token(cfg, 1, seq) * batch * seq
    assert xla == pytest.approx(ours, rel=0.1)
