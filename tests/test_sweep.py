"""Sweeps (rdlm.sweep): the grid, its validation, run-folder hashes, a 2-point sweep trained, interrupted,
resumed and skipped, and the TPU launch commands."""

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from rdlm.config import ConfigError, load_config
from rdlm.flops import train_flops_per_token
from rdlm.sweep import expand, grid, load_sweep, main, override_text, run, sampled_depths


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_grid_is_product_times_zip():
    points = grid({"a": [1, 2], "b": ["x", "y"]}, {"c": [10, 20], "d": [30, 40]})
    assert len(points) == 8
    assert points[:3] == [{"a": 1, "b": "x", "c": 10, "d": 30}, {"a": 1, "b": "x", "c": 20, "d": 40},
                          {"a": 1, "b": "y", "c": 10, "d": 30}]
    assert points[-1] == {"a": 2, "b": "y", "c": 20, "d": 40}
    assert grid({}, {}) == [{}] and grid({}, {"c": [1, 2]}) == [{"c": 1}, {"c": 2}]


@pytest.mark.parametrize("body, words", [
    ("zip: {model.mean_recurrence: [4, 8, 16], model.mean_backprop_depth: [1, 4]}",
     ["zip lists must have equal lengths", "model.mean_recurrence has 3", "model.mean_backprop_depth has 2"]),
    ("product: {model.n_heads: 4}", ["product.model.n_heads must be a non-empty list"]),
    ("product: {model.n_heads: [4]}\nzip: {model.n_heads: [2]}", ["model.n_heads is set in both product and zip"]),
    ("overrides: [train.out_dir=x]", ["overrides.train.out_dir", "set out: instead"]),
    ("produkt: {model.n_heads: [4]}", ["unknown config key 'produkt'", "did you mean product?"]),
    ("recurrence: [1, 0]", ["recurrence: expected a list of integers >= 1"]),
])
def test_sweep_file_errors_name_the_problem(tmp_path, body, words):
    path = write(tmp_path / "s.yml", f"base: tiny\nout: out\n{body}\n")
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("grid_text, words", [
    ("product: {model.mean_recurence: [4, 8]}",
     ["point 1/2 (model.mean_recurence=4)", "unknown config key 'model.mean_recurence'",
      "did you mean model.mean_recurrence?"]),
    ("product: {model.mean_recurrence: [4, 0]}",
     ["point 2/2 (model.mean_recurrence=0)", "model.mean_recurrence: 0 is out of range"]),
    ("zip: {train.batch_size: [8, 6], train.grad_accum: [2, 4]}",
     ["point 2/2 (train.batch_size=6, train.grad_accum=4)", "must be divisible by train.grad_accum=4"]),
    ("product: {train.log_every: [1, 2]}", ["point 2/2 (train.log_every=2) trains the same model as point 1/2"]),
])
def test_every_point_is_validated_naming_key_and_point(tmp_path, grid_text, words):
    with pytest.raises(ConfigError) as e:
        expand(load_sweep(write(tmp_path / "s.yml", f"base: tiny\nout: out\n{grid_text}\n")))
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("key, value, read", [
    ("train.eval_recurrence", [1, 4], lambda c: list(c.train.eval_recurrence)),
    ("optim.lr", 1e-5, lambda c: c.optim.lr),
    ("model.qk_bias", False, lambda c: c.model.qk_bias), ("data.jsonl_key", "on", lambda c: c.data.jsonl_key),
    ("mesh.rules.batch", None, lambda c: c.mesh.rules.batch),
    ("mesh.rules.batch", ["data", "fsdp"], lambda c: list(c.mesh.rules.batch)),
    ("mesh.rules", {"vocab": None}, lambda c: {"vocab": c.mesh.rules.vocab}),
])
def test_override_text_parses_back(key, value, read):
    """What a point sets is what rdlm.train reads from its command line."""
    assert read(load_config("tiny", [override_text(key, value)])) == value


def test_hash_is_of_the_resolved_config(tmp_path, monkeypatch):
    body = "base: tiny\nout: out\nproduct: {{model.mean_recurrence: [4, 8]}}\noverrides:\n{}"
    fixed = ["  optim.lr: 2.0e-3\n  data.tokenizer: tok.model\n",
             "  data.tokenizer: tok.model\n  optim.lr: 0.002\n",  # another order and spelling
             "  data.tokenizer: tok.model\n  optim.lr: 0.002\n  train.log_every: 3\n  model.dtype: float32\n"]
    digests = []
    for i, text in enumerate(fixed):
        folder = tmp_path / f"cwd{i}"
        folder.mkdir()
        monkeypatch.chdir(folder)  # the working directory does not matter
        points = expand(load_sweep(write(tmp_path / f"s{i}.yml", body.format(text))))
        digests.append([p.digest for p in points])
        assert [p.name for p in points] == [f"mean_recurrence{r}-{p.digest}" for r, p in zip((4, 8), points)]
        assert points[0].config.data.tokenizer == str(tmp_path / "tok.model")  # relative to the sweep file
    assert digests[0] == digests[1] == digests[2] and digests[0][0] != digests[0][1]
    other = expand(load_sweep(write(tmp_path / "s3.yml", body.format("  optim.lr: 3.0e-3\n"))))
    assert other[0].digest not in digests[0]


class StopOnce:
    """should_stop that interrupts the first run it sees at `step`, as a preemption would."""

    def __init__(self, step: int):
        self.step, self.fired = step, False

    def __call__(self, step: int) -> bool:
        if step == self.step and not self.fired:
            self.fired = True
            return True
        return False


@pytest.mark.slow
def test_sweep_trains_resumes_skips_and_collects(tmp_path, tokenizer_path, monkeypatch, capsys):
    monkeypatch.setenv("RDLM_PEAK_FLOPS", "1e12")  # no peak measurement in each run
    sweep_file = write(tmp_path / "exp" / "sweep.yml", f"""
base: tiny
out: ../sweeps/s
overrides:
  model.vocab_size: 512
  model.n_layers_in_prelude: 1
  model.n_layers_in_recurrent_block: 1
  model.n_layers_in_coda: 1
  model.mean_backprop_depth: 1
  data.tokenizer: {tokenizer_path}
  data.prefetch: 0
  train.steps: 4
  train.log_every: 1
  train.eval_every: 2
  train.eval_batches: 1
  train.eval_recurrence: [1, 2]
  train.checkpoint_every: 2
product:
  model.mean_recurrence: [1, 2]
recurrence: [1, 2, 4]
eval_batches: 1
""")
    out = tmp_path / "sweeps" / "s"
    points = expand(load_sweep(sweep_file))
    runs = [out / p.name for p in points]

    rows = run(load_sweep(sweep_file), should_stop=StopOnce(2))  # the first point is interrupted at step 2
    assert [r["status"] for r in rows] == ["at step 2/4", "finished"]
    assert "val_loss_r1" not in rows[0] and rows[1]["val_loss_r4"] > 0
    assert sorted(p.name for p in (runs[0] / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the CLI from another folder, with a relative path
    capsys.readouterr()
    assert main([os.path.relpath(sweep_file)]) == 0
    printed = capsys.readouterr().out
    assert f"[1/2] {points[0].name}: resuming from step 2 to step 4" in printed
    assert f"[2/2] {points[1].name}: skipped, finished at step 4" in printed
    starts = [r["step"] for r in map(json.loads, (runs[0] / "metrics.jsonl").read_text().splitlines())
              if r.get("event") == "start"]
    assert starts == [0, 2]

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == [p.name for p in points]
    assert [r["model.mean_recurrence"] for r in table] == ["1", "2"]
    assert all(r["status"] == "finished" and float(r["val_loss_r4"]) > 0 and float(r["train_loss"]) > 0
               for r in table)
    assert {int(r["train_tokens"]) for r in table} == {4 * 8 * 32}
    for point, row, folder in zip(points, table, runs):  # the FLOPs of the depths each run logged, step by step
        logged = {r["step"]: (r["n"], r["k"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text()
                                                             .splitlines()) if "n" in r}
        depths = [logged[s] for s in range(1, 5)]
        assert list(zip(*map(list, sampled_depths(point.config)))) == depths
        cfg = point.config.model
        assert float(row["train_flops"]) == pytest.approx(sum(train_flops_per_token(cfg, n, k, 32) * 8 * 32
                                                              for n, k in depths), rel=1e-12)
    markdown = (out / "results.md").read_text()
    assert "| run | model.mean_recurrence | status | train loss | val r=1 | val r=2 | val r=4 |" in markdown
    for png in ("val_loss_vs_recurrence.png", "val_loss_vs_flops.png"):
        assert (out / png).stat().st_size > 5000 and f"({png})" in markdown

    before = {f: f.stat().st_mtime_ns for folder in runs for f in folder.rglob("*") if f.is_file()}
    assert main([str(sweep_file)]) == 0  # everything done: nothing trains or evaluates again
    printed = capsys.readouterr().out
    assert printed.count("skipped, finished at step 4") == 2 and "resuming" not in printed
    assert {f: f.stat().st_mtime_ns for folder in runs for f in folder.rglob("*") if f.is_file()} == before


@pytest.mark.slow
def test_tpu_launch_dry_run_prints_one_gcloud_command_per_point(tmp_path):
    out = REPO / "runs" / "sweep-test-dry-run"
    sweep_file = write(tmp_path / "s.yml", f"base: tiny\nout: {out}\nproduct: {{model.mean_recurrence: [2, 4]}}\n"
                                           "overrides: ['train.eval_recurrence=[1, 2]']\n")
    points = expand(load_sweep(sweep_file))
    done = subprocess.run([sys.executable, "-m", "rdlm.sweep", "s.yml", "--launch", "tpu", "--name", "vm",
                           "--zone", "us-central2-b", "--dry-run"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    train = [".venv/bin/python -m rdlm.train tiny 'train.eval_recurrence=[1,2]' model.mean_recurrence={} "
             "train.out_dir=runs/sweep-test-dry-run/{}".format(r, p.name) for r, p in zip((2, 4), points)]
    expected = [shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vm", "--zone=us-central2-b", "--worker=all",
                            f"--command=cd ~/rdlm && {t} 2>&1 | tee -a train.log"]) for t in train]
    assert done.stdout.splitlines() == expected
    assert not out.exists()


def test_tpu_launch_refuses_paths_outside_the_checkout(tmp_path, capsys):
    sweep_file = write(tmp_path / "s.yml", "base: tiny\nout: out\n")
    assert main([str(sweep_file), "--launch", "tpu", "--name", "vm", "--zone", "z", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert f"out={tmp_path / 'out'}" in err and "outside the checkout" in err
    assert main([str(sweep_file), "--launch", "tpu", "--dry-run"]) == 1
    assert "--launch tpu needs --name and --zone" in capsys.readouterr().err


def test_print_commands_gives_one_train_command_per_point(tmp_path, capsys):
    sweep_file = write(tmp_path / "s.yml", "base: tiny\nout: out\nzip: {optim.lr: [1.0e-3, 2.0e-3], "
                                           "optim.warmup_steps: [2, 4]}\n")
    points = expand(load_sweep(sweep_file))
    assert main([str(sweep_file), "--print-commands"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        shlex.join([sys.executable, "-m", "rdlm.train", "tiny", f"optim.lr={lr}", f"optim.warmup_steps={w}",
                    f"train.out_dir={tmp_path / 'out' / p.name}"]) for lr, w, p in zip((0.001, 0.002), (2, 4), points)]
    assert [p.name.rsplit("-", 1)[0] for p in points] == ["lr0.001_warmup_steps2", "lr0.002_warmup_steps4"]
    assert not (tmp_path / "out").exists()
