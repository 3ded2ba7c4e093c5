import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import rdlm
from rdlm import convert as conv
from rdlm import hf
from rdlm.checkpoint import CheckpointError
from rdlm.config import ConfigError
from rdlm.tokenizer import load_tokenizer
from conftest import FIXTURES, REPO


def assert_trees_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


def test_convert_then_load_equals_direct_load(official, tmp_path):
    path, _ = official
    conv.convert(path, tmp_path / "ckpt")
    config, params = rdlm.load_model(tmp_path / "ckpt")
    cfg, direct = rdlm.load_hf_checkpoint(path)
    assert config.model == cfg
    assert_trees_bitwise_equal(params, direct)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 60_000])
def test_export_then_import_is_bit_exact(official, tmp_path, max_shard_bytes):
    path, _ = official
    conv.convert(path, tmp_path / "ckpt")
    conv.export(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=max_shard_bytes)
    files = os.listdir(tmp_path / "hf")
    assert (hf.INDEX_FILE in files) == (max_shard_bytes < 2**20)
    cfg, again = rdlm.load_hf_checkpoint(tmp_path / "hf")
    _, original = rdlm.load_hf_checkpoint(path)
    assert cfg == rdlm.load_model(tmp_path / "ckpt")[0].model
    assert_trees_bitwise_equal(again, original)
    # The official code loads the RoPE table buffer and keeps lm_head tied, as save_pretrained writes it.
    tensors = {}
    for f in files:
        if f.endswith(".safetensors"):
            tensors |= load_file(tmp_path / "hf" / f)
    assert "freqs_cis" in tensors and "lm_head.weight" not in tensors


def test_load_casts_dtype(tmp_path):
    conv.convert(FIXTURES / "tiny_bf16_sharded", tmp_path / "ckpt")
    _, params = rdlm.load_model(tmp_path / "ckpt", dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}


def _rewrite(tmp_path, edit):
    """Copy the fp32 fixture with its tensors edited by `edit(dict)`."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(FIXTURES / "tiny_fp32" / "config.json", src)
    tensors = load_file(FIXTURES / "tiny_fp32" / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors")
    return src


def test_all_tensor_problems_in_one_error(tmp_path):
    def edit(t):
        del t["transformer.core_block.2.mlp.fc.weight"]
        del t["transformer.ln_f.weight"]
        t["transformer.extra.weight"] = np.zeros(3, np.float32)
        t["transformer.adapter.weight"] = np.zeros((32, 32), np.float32)
        t["freqs_cis"] = np.zeros((1, 16, 1, 4, 2), np.float32)
    src = _rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        conv.convert(src, tmp_path / "dst")
    msg = str(err.value)
    assert "5 problems" in msg
    assert "missing    transformer.core_block.2.mlp.fc.weight (expected [160, 32])" in msg
    assert "missing    transformer.ln_f.weight (expected [32])" in msg
    assert "unexpected transformer.extra.weight (found [3]" in msg
    assert "mis-shaped transformer.adapter.weight: expected [32, 64], found [32, 32]" in msg
    assert "mis-shaped freqs_cis: expected [1, 32, 1, 4, 2], found [1, 16, 1, 4, 2]" in msg
    assert not (tmp_path / "dst").exists()


def test_untied_head_is_unexpected_when_config_ties(tmp_path):
    src = _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": np.zeros((256, 16), np.float32)}))
    with pytest.raises(CheckpointError, match=r"mis-shaped lm_head.weight: expected \[256, 32\]"):
        conv.convert(src, tmp_path / "dst")


def test_tied_head_must_equal_the_embedding(tmp_path):
    def edit(t):
        t["lm_head.weight"] = t["transformer.wte.weight"].copy()
        t["lm_head.weight"][-1, -1] += 1
    src = _rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError, match="lm_head.weight differs from transformer.wte.weight"):
        conv.convert(src, tmp_path / "dst")
    with pytest.raises(CheckpointError, match="differs"):  # found in the last of several chunks
        hf._check_tied_head(hf.hf_index(src), "transformer.wte.weight", chunk=1000)
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    save_file(tensors, src / "model.safetensors")
    hf._check_tied_head(hf.hf_index(src), "transformer.wte.weight", chunk=1000)


def test_unsupported_dtype_is_named(tmp_path):
    src = _rewrite(tmp_path, lambda t: t.update({"transformer.ln_f.weight": np.zeros(32, np.int64)}))
    with pytest.raises(CheckpointError, match="transformer.ln_f.weight has dtype I64; supported: F32, BF16"):
        conv.convert(src, tmp_path / "dst")


def _copy_sharded(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "tiny_bf16_sharded", src)
    return src


def test_truncated_shard_is_named_and_nothing_written(tmp_path):
    src = _copy_sharded(tmp_path)
    shard = src / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors: truncated"):
        conv.convert(src, tmp_path / "dst")
    assert sorted(os.listdir(tmp_path)) == ["src"]


@pytest.mark.parametrize("garbage", [b"\xff" * 8, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", b"ab"])
def test_corrupt_header_is_named(tmp_path, garbage):
    src = _copy_sharded(tmp_path)
    shard = src / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(garbage + data[len(garbage):] if len(garbage) > 2 else garbage)
    with pytest.raises(CheckpointError, match="model-00003-of-00003.safetensors"):
        conv.convert(src, tmp_path / "dst")


def test_missing_shard_and_missing_files(tmp_path):
    src = _copy_sharded(tmp_path)
    (src / "model-00001-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard files that do not exist: model-00001-of-00003.safetensors"):
        conv.convert(src, tmp_path / "dst")
    with pytest.raises(CheckpointError, match="cannot read HF config .*config.json"):
        conv.convert(FIXTURES, tmp_path / "dst")
    (tmp_path / "bare").mkdir()
    shutil.copy(src / "config.json", tmp_path / "bare")
    with pytest.raises(CheckpointError, match="bare: no model.safetensors and no model.safetensors.index.json"):
        conv.convert(tmp_path / "bare", tmp_path / "dst")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        conv.convert(tmp_path / "nowhere", tmp_path / "dst")
    with pytest.raises(CheckpointError, match="is not an rdlm model checkpoint"):
        rdlm.load_model(src)


def test_failure_midway_leaves_no_destination(tmp_path, monkeypatch):
    calls = []

    def flaky(entry, *args):
        calls.append(entry.name)
        if len(calls) == 40:
            raise CheckpointError(f"{entry.file}: simulated read failure")
        return real(entry, *args)
    real = hf.read_tensor
    monkeypatch.setattr(hf, "read_tensor", flaky)
    monkeypatch.setattr(conv, "SAVE_BATCH_BYTES", 10_000)  # several partial saves happen before the failure
    with pytest.raises(CheckpointError, match="simulated"):
        conv.convert(FIXTURES / "tiny_fp32", tmp_path / "dst")
    assert os.listdir(tmp_path) == []


def test_existing_destination_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        conv.convert(FIXTURES / "tiny_fp32", tmp_path / "dst")
    assert (tmp_path / "dst" / "keep").exists()
    conv.convert(FIXTURES / "tiny_fp32", tmp_path / "dst", overwrite=True)
    assert not (tmp_path / "dst" / "keep").exists()


def test_bad_config_json_is_named(tmp_path):
    src = _copy_sharded(tmp_path)
    hf = json.loads((src / "config.json").read_text()) | {"mlp_class_name": "MLP"}
    (src / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"config.json: mlp_class_name='MLP' is not supported"):
        conv.convert(src, tmp_path / "dst")


def test_cli_round_trip(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "rdlm.convert", str(FIXTURES / "tiny_fp32"), str(tmp_path / "c")],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "parameters" in run.stdout
    assert conv.main(["--export", str(tmp_path / "c"), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert conv.main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 1
    assert "error: " in capsys.readouterr().err


def test_load_model_rejects_params_that_do_not_fit_config(tmp_path):
    conv.convert(FIXTURES / "tiny_fp32", tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.yml"
    config_file.write_text(config_file.read_text().replace("intermediate_size: 80", "intermediate_size: 96"))
    with pytest.raises(CheckpointError, match=r"mis-shaped parameters: \['coda'\]\[0\]\['mlp'\]\['fc'\]: "
                                              r"expected \[32, 2, 96\], found \[32, 2, 80\]"):
        rdlm.load_model(tmp_path / "ckpt")
    config_file.write_text(config_file.read_text().replace("n_layers_in_coda: 2", "n_layers_in_coda: 1"))
    with pytest.raises(CheckpointError, match="parameter tree does not match"):
        rdlm.load_model(tmp_path / "ckpt")
    config_file.write_text("model:\n  n_embdd: 3\n")
    with pytest.raises(CheckpointError, match="did you mean model.n_embd"):
        rdlm.load_model(tmp_path / "ckpt")


def test_tokenizer_files_are_copied_and_checked(tmp_path, tokenizer_path):
    src = _copy_sharded(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "hf_tokenizer" / name, src)
    (src / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|end_turn|>"}}))
    conv.convert(src, tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "ckpt" / name).read_bytes() == (src / name).read_bytes()
    assert not (tmp_path / "ckpt" / "tokenizer.model").exists()
    tok = load_tokenizer(tmp_path / "ckpt", model_vocab_size=256)
    assert tok.pad == tok.token_id("<|end_turn|>") and tok.chat_template

    shutil.copy(tokenizer_path, src / "tokenizer.model")  # 512 pieces: more than the model's 256 rows
    (src / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"tokenizer.model has 512 token ids but the model has model.vocab_size=256"):
        conv.convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_failed_tokenizer_copy_leaves_no_destination(tmp_path, monkeypatch):
    src = _copy_sharded(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "hf_tokenizer" / name, src)
    copied, real = [], shutil.copyfile

    def flaky(a, b):
        if copied:
            raise OSError(f"{a}: simulated copy failure")
        copied.append(real(a, b))
    monkeypatch.setattr(conv.shutil, "copyfile", flaky)
    with pytest.raises(OSError, match="simulated"):
        conv.convert(src, tmp_path / "dst")
    assert copied and sorted(os.listdir(tmp_path)) == ["src"]
