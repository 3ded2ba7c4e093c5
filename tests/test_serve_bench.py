"""`tools/bench.py serve`: the server against sequential generation, end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench.py"


@pytest.mark.slow
def test_serve_bench_answers_every_request(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "serve", "tiny", "--clients", "2", "--requests", "4",
                          "--new", "4", "--steps", "2", "--slots", "2", "--timeout", "300"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    sequential, batched, level = records
    assert sequential["kind"] == "sequential" and sequential["tokens_per_s"] > 0
    assert batched["kind"] == "batched" and batched["tokens"] == sequential["tokens"] and batched["tokens_per_s"] > 0
    assert level["kind"] == "serve" and level["clients"] == 2 and level["sent"] == 4
    assert level["answered"] + level["rejected"] == level["sent"] and level["failed"] == 0
    for key in ("tokens_per_s", "p50_s", "p99_s", "mismatches", "speedup_vs_sequential", "fraction_of_batched", "timed_out"):
        assert key in level
