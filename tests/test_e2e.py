"""End-to-end runs of the scripts a user calls: the demo experiment and the benchmarks."""

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
