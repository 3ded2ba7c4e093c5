"""End-to-end runs of the scripts a user calls: the demo experiment and the benchmarks."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import FIXTURES, REPO

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run(*args):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_demo_experiment_prints_parity_table(tmp_path):
    out = run("experiments/tiny_parity.py", "--out", str(tmp_path / "ckpt"), "--steps", "1,4,32")
    rows = [line.split() for line in out.splitlines() if line.strip()[:2].strip().isdigit()]
    assert [r[0] for r in rows] == ["1", "4", "32"]
    assert all(float(r[1]) <= 1e-5 and r[2] == "100.0%" for r in rows)


def test_bench_forward_reports_one_compile():
    out = run("tools/bench.py", "forward", "tiny", "model.mean_recurrence=4", "--batch", "2", "--seq", "8",
              "--steps", "4,64", "--iters", "2")
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["num_steps"] for r in records] == [4, 64]
    for r in records:
        assert r["bench"] == "forward" and r["config"] == "tiny" and r["overrides"] == ["model.mean_recurrence=4"]
        assert r["jit_cache_size"] == 1 and r["tokens_per_s"] > 0 and 0 < r["mfu"]


def test_bench_convert_on_tiny_shapes():
    out = run("tools/bench.py", "convert", "tiny", "--shards", "3", "--dtype", "float32")
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record["shards"] == 3 and record["peak_rss_bytes"] > 0 and record["seconds"] > 0


def test_tokenizer_train_and_sweep_clis(tmp_path):
    out = run("tools/train_tokenizer.py", "tiny", "model.vocab_size=400", "--vocab-size", "400",
              "--out", str(tmp_path / "tok"))
    assert "400 pieces" in out
    overrides = ["model.vocab_size=400", f"data.tokenizer={tmp_path / 'tok.model'}", f"train.out_dir={tmp_path / 'run'}",
                 "train.steps=4", "train.eval_every=4", "train.checkpoint_every=2"]
    out = run("-m", "rdlm.train", "tiny", *overrides)
    assert "4/20" not in out and "     4/4 |" in out and "val r=1" in out
    out = run("experiments/recurrence_sweep.py", str(tmp_path / "run"), "--recurrence", "1,2,4", "--batches", "2",
              "--sample-tokens", "5")
    assert "at step 4" in out and (tmp_path / "run" / "recurrence_sweep.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "recurrence_sweep.json").read_text())["step"] == 4
    out = run("-m", "rdlm.inference", "--checkpoint", str(tmp_path / "run"), "--prompt", "To be", "--num-steps", "2",
              "--max-new-tokens", "3")  # a training run folder; its sentencepiece model comes from data.tokenizer
    assert "--- prompt 0: 'To be'" in out and "2.00 recurrence steps per token" in out


def test_train_cli_reports_bad_config():
    out = subprocess.run([sys.executable, "-m", "rdlm.train", "tiny", "train.stpes=3"], capture_output=True,
                         text=True, env=ENV, cwd=REPO, timeout=600)
    assert out.returncode == 1 and "did you mean train.steps" in out.stderr


def test_bench_train_memory_is_flat_in_mean_recurrence():
    out = run("tools/bench.py", "train", "tiny", "--batch", "2", "--seq", "16", "--steps", "4,64", "--iters", "1")
    small, large = [json.loads(line) for line in out.splitlines()]
    assert (small["n"], small["k"], large["n"], large["k"]) == (0, 4, 60, 4)
    assert abs(large["temp_bytes"] - small["temp_bytes"]) <= 0.1 * small["temp_bytes"]


def test_bench_memory_on_virtual_mesh_and_skipped_topology():
    out = run("tools/bench.py", "memory", "tiny", "--devices", "8", "--batch", "8", "--seq", "32", "mesh.fsdp=2",
              "mesh.tensor=2")
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and record["fits"]
    assert record["state_bytes_per_device"] == 16 * record["params_per_device"] and record["temp_bytes"] > 0
    if importlib.util.find_spec("libtpu") is None:
        out = run("tools/bench.py", "memory", "tiny", "--topology", "v5e:2x4")
        assert "libtpu is not installed" in json.loads(out.splitlines()[-1])["skipped"]


def test_generate_cli_on_converted_and_hf_checkpoints(tmp_path):
    """Convert the official tiny checkpoint (with HF tokenizer files), then generate from both directories."""
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in [FIXTURES / "tiny_fp32" / "config.json", FIXTURES / "tiny_fp32" / "model.safetensors",
              *(FIXTURES / "hf_tokenizer").iterdir()]:
        shutil.copy(f, hf / f.name)
    run("-m", "rdlm.convert", str(hf), str(tmp_path / "ckpt"))
    args = ["--prompt", "To be, or not", "--prompt", "Hi", "--num-steps", "4", "--max-new-tokens", "6", "--chat",
            "--init-scale", "0", "--exit-criterion", "entropy-diff", "--exit-threshold", "0.01",
            "--cache-strategy", "latest-m4"]
    converted = run("-m", "rdlm.inference", "--checkpoint", str(tmp_path / "ckpt"), *args)
    assert converted.count("--- prompt") == 2 and converted.count("recurrence steps per token") == 2
    assert run("-m", "rdlm.inference", "--checkpoint", str(hf), *args) == converted


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "missing_dir"], "checkpoint missing_dir does not exist"),
    (["--checkpoint", "tests/fixtures/tiny_fp32", "--tokenizer", "tests/fixtures/hf_tokenizer", "--num-steps", "0"],
     "--num-steps=0 is out of range; valid range is [1, 2147483647]"),
    (["--checkpoint", "tests/fixtures/tiny_fp32", "--tokenizer", "tests/fixtures/hf_tokenizer",
      "--cache-strategy", "newest"], "unknown --cache-strategy='newest'"),
])
def test_generate_cli_reports_bad_input(args, message):
    out = subprocess.run([sys.executable, "-m", "rdlm.inference", "--prompt", "x", "--max-new-tokens", "4", *args],
                         capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert out.returncode == 1 and message in out.stderr


def test_bench_decode_reports_each_batch_criterion_and_strategy():
    # decode tokens/s is (generation - prefill) time: enough new tokens and best of 3, or noise can exceed it
    out = run("tools/bench.py", "decode", "tiny", "--seq", "4", "--new", "16", "--steps", "2", "--batches", "1,2",
              "--iters", "3", "--criteria", "entropy-diff,none")
    records = [json.loads(line) for line in out.splitlines()]
    kinds = {k: [r for r in records if r["kind"] == k] for k in ("cache", "generate", "exit")}
    assert [r["batch"] for r in kinds["generate"]] == [1, 2]
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in kinds["generate"])
    assert [r["criterion"] for r in kinds["exit"]] == ["entropy-diff", "none"]
    assert all(1 <= r["mean_steps_per_token"] <= 2 for r in kinds["exit"])
    assert {r["strategy"] for r in kinds["cache"]} >= {"full", "compress-s4", "compress-anchor"}
    huge = run("tools/bench.py", "decode", "huginn_0125", "--cache-only", "--seq", "4000", "--new", "96",
               "--steps", "32")
    full = [json.loads(line) for line in huge.splitlines() if '"full"' in line][0]
    assert full["cache_bytes"] > 10 * 2**30  # bf16: 4096 positions x (2 + 32 x 4 + 2) layers x (k, v) x 5280
