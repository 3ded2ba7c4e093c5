"""End-to-end runs of the scripts a user calls: the demo experiment and the benchmarks."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

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
