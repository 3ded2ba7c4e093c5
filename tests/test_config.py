import dataclasses
import json

import pytest

from rdlm.config import Config, ConfigError, ModelConfig, dump_config, load_config
from conftest import FIXTURES

# Values of the released huginn-0125, read off the official recpre/raven_config_minimal.{py,json}.
HUGINN_0125 = dict(n_embd=5280, n_heads=55, intermediate_size=17920, vocab_size=65536, padding_multiple=4096,
                   block_size=4096, n_layers_in_prelude=2, n_layers_in_recurrent_block=4, n_layers_in_coda=2,
                   mean_recurrence=32, mean_backprop_depth=8, rope_base=50000.0, norm_eps=1e-6, qk_bias=True,
                   bias=False, tie_embeddings=True)


def test_huginn_preset_has_released_values():
    cfg = load_config("huginn_0125").model
    assert {k: getattr(cfg, k) for k in HUGINN_0125} == HUGINN_0125
    assert (cfg.head_dim, cfg.n_layers, cfg.effective_expected_depth) == (96, 8, 132)
    assert cfg.embed_scale == pytest.approx(5280 ** 0.5)


def test_overrides_apply_with_types():
    cfg = load_config("tiny", ["model.mean_recurrence=16", "model.rope_base=10000", "model.qk_bias=false"])
    assert cfg.model.mean_recurrence == 16 and cfg.model.rope_base == 10000.0 and cfg.model.qk_bias is False
    assert isinstance(cfg.model.rope_base, float)


@pytest.mark.parametrize("override, message", [
    ("model.mean_recurence=8", "did you mean model.mean_recurrence"),
    ("modle.n_embd=8", "did you mean model"),
    ("model.n_heads=four", "model.n_heads: expected int, got str"),
    ("model.n_heads=1.5", "model.n_heads: expected int, got float"),
    ("model.qk_bias=3", "model.qk_bias: expected bool"),
    ("model.n_heads=0", "model.n_heads: 0 is out of range [1, inf)"),
    ("model.norm_eps=2", "model.norm_eps: 2.0 is out of range (0, 1]"),
    ("model.dtype=float16", "model.dtype: 'float16' is not one of"),
    ("model.n_heads=5", "model.n_embd=32 must be divisible by model.n_heads=5"),
    ("model.n_heads", "not of the form"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config("tiny", [override])
    assert message in str(err.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="presets in .*huginn_0125"):
        load_config("nope")


def test_yaml_round_trip(tmp_path):
    cfg = load_config("tiny", ["model.mean_recurrence=12"])
    dump_config(cfg, tmp_path / "c.yml")
    assert load_config(tmp_path / "c.yml") == cfg


def test_hf_config_round_trip_and_official_file():
    cfg = load_config("huginn_0125").model
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == dataclasses.replace(cfg, dtype="float32")
    # A config.json written by the official code reads back as our tiny preset.
    assert ModelConfig.from_hf_json(FIXTURES / "tiny_fp32" / "config.json") == load_config("tiny").model


def test_hf_config_of_official_json_form():
    # The released config.json spells heads as num_attention_heads and omits rope_base (default 50000).
    official = {"model_type": "huginn_raven", "num_attention_heads": 55, "num_key_value_heads": 55, "n_embd": 5280,
                "block_size": 4096, "vocab_size": 65536, "intermediate_size": 17920, "n_layers_in_recurrent_block": 4,
                "n_layers_in_prelude": 2, "n_layers_in_coda": 2, "mean_recurrence": 32, "mean_backprop_depth": 8,
                "qk_bias": True, "tie_embeddings": True, "bias": False, "norm_eps": 1e-6, "padding_multiple": 4096,
                "architecture_class_name": "RecurrentGPT", "injection_type": "linear"}
    assert ModelConfig.from_hf_dict(official) == Config().model


@pytest.mark.parametrize("key, value, message", [
    ("injection_type", "additive", "model.injection: 'additive' is not one of"),
    ("norm_class_name", "LayerNorm", "norm_class_name='LayerNorm' is not supported"),
    ("model_type", "llama", "model_type='llama'"),
    ("num_key_value_heads", 1, "no GQA"),
    ("n_layers", 9, "n_layers=9 but prelude+core+coda = 8"),
    ("n_embd", "big", "model.n_embd: expected int"),
])
def test_hf_config_rejects_what_we_do_not_implement(key, value, message):
    hf = ModelConfig().to_hf_dict() | {key: value}
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_hf_dict(hf)
    assert message in str(err.value)


@pytest.mark.parametrize("preset", ["huginn_0125", "tiny", "demo"])
def test_every_preset_loads_and_round_trips(preset, tmp_path):
    cfg = load_config(preset)
    dump_config(cfg, tmp_path / "c.yml")
    assert load_config(tmp_path / "c.yml") == cfg


def test_cross_section_checks():
    with pytest.raises(ConfigError, match="train.seq_len=64 exceeds model.block_size=32"):
        load_config("tiny", ["train.seq_len=64"]).check_trainable()
    with pytest.raises(ConfigError, match="train.batch_size=8 must be divisible by train.grad_accum=3"):
        load_config("tiny", ["train.grad_accum=3"]).check_trainable()
    with pytest.raises(ConfigError, match="train.recurrence: 'random' is not one of"):
        load_config("tiny", ["train.recurrence=random"])
