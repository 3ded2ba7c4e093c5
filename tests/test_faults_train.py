"""Faults around training runs: damaged or mismatched checkpoints, failed starts, two runs on one folder,
non-finite streaks, kills during a save, unwritable folders, vanishing data; nothing may be lost."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from faultlib import ENV, fails_in_process

import rdlm.train as train_mod
from rdlm.checkpoint import load_run
from rdlm.config import load_config
from rdlm.train import TrainingError, main as train_main, run_lock, train

pytestmark = pytest.mark.slow


CORPUS: list[str] = []  # overrides that select the small corpus below


@pytest.fixture(scope="module", autouse=True)
def small_corpus(tmp_path_factory):
    """A few short documents: faster to read, tokenize and restore than the 42 plays."""
    docs = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        (docs / f"{i}.txt").write_text(f"Document {i}. " + "To be, or not to be, that is the question. " * 40)
    CORPUS[:] = ["data.source=text", f"data.paths=[{docs}/*.txt]"]


def config(overrides, *extra):
    """The tiny preset on the small corpus, no validation split (no eval compile), a checkpoint every step."""
    return load_config("tiny", argv(overrides, *extra)[1:])


def argv(overrides, *extra):
    return ["tiny", *overrides, *CORPUS, "data.val_fraction=0", "train.checkpoint_every=1", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer_path):
    """A run folder trained for 2 steps with checkpoints 1 and 2 (tests work on copies)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(config(["model.vocab_size=512", f"data.tokenizer={tokenizer_path}", "data.prefetch=0",
                  f"train.out_dir={out}", "train.steps=2"]))
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path, tokenizer_path):
    """(overrides that resume it, run folder): a private copy of `finished_run`."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return ["model.vocab_size=512", f"data.tokenizer={tokenizer_path}", "data.prefetch=0", f"train.out_dir={out}"], out


def _damage_step(step_dir: Path) -> None:
    for f in step_dir.rglob("d/*"):
        if f.is_file():
            f.write_bytes(b"")


def test_all_checkpoints_unreadable_keeps_refusing_until_opted_in(run_copy, capsys):
    overrides, out = run_copy
    for step in ("1", "2"):
        _damage_step(out / "checkpoints" / step)
    for attempt in range(3):  # the first sets both steps aside; every later rerun must still refuse
        fails_in_process(train_main, argv(overrides, "train.steps=3"), capsys, "no checkpoint in",
                         "1.unreadable, 2.unreadable", "train.restart_from_scratch=true")
        assert sorted(os.listdir(out / "checkpoints")) == ["1.unreadable", "2.unreadable"]
    summary = train(config(overrides, "train.steps=1", "train.restart_from_scratch=true"))
    assert summary["start_step"] == 0 and summary["step"] == 1
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "1.unreadable", "2.unreadable"]


def test_settings_mismatch_without_config_yml_touches_nothing(run_copy, capsys):
    overrides, out = run_copy
    (out / "config.yml").unlink()
    fails_in_process(train_main, argv(overrides, "train.steps=3", "model.n_embd=64", "optim.lr=0.5"), capsys,
                     "different settings", "model.n_embd (32 in the checkpoint, 64 now)", "optim.lr",
                     keep=(out,))
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]


def test_steps_below_the_resumed_step(run_copy, capsys):
    overrides, out = run_copy
    fails_in_process(train_main, argv(overrides, "train.steps=1"), capsys, "at step 2", "train.steps=1",
                     keep=(out / "checkpoints",))
    assert train_main(argv(overrides, "train.steps=2")) == 0
    assert "nothing to do: the run is complete at step 2" in capsys.readouterr().out


def test_failed_starts_write_nothing_and_the_corrected_rerun_trains(train_overrides, tmp_path, capsys):
    out = load_config("tiny", train_overrides).train.out_dir
    bad = [(["data.tokenizer=nope/tok.model"], "nope/tok.model"),
           (["data.source=text", f"data.paths=[{tmp_path}/none-*.txt]"], "matches no file"),
           (["optim.lr=.nan"], "optim.lr")]
    for extra, needle in bad:
        fails_in_process(train_main, argv(train_overrides, *extra, "train.steps=1"), capsys, needle)
        assert not Path(out, "config.yml").exists() and not list(Path(out).glob("checkpoints/*"))
    assert train_main(argv(train_overrides, "train.steps=1")) == 0
    assert Path(out, "config.yml").is_file()


def test_second_run_on_the_same_folder_is_refused(train_overrides, capsys):
    out = Path(load_config("tiny", train_overrides).train.out_dir)
    out.mkdir(parents=True)
    with run_lock(out):
        err = fails_in_process(train_main, argv(train_overrides, "train.steps=1"), capsys, "is in use by",
                               f"pid {os.getpid()}", "another train.out_dir", keep=(out,))
    assert "hint:" in err
    with run_lock(out):  # released by the refused run and by the holder
        pass


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rdlm.train import run_lock; "
                               f"from pathlib import Path\nwith run_lock(Path({str(out)!r})):\n"
                               "    print('locked', flush=True); time.sleep(600)"],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(TrainingError, match=f"pid {holder.pid}"):
        with run_lock(out):
            pass
    holder.kill()
    holder.wait()
    with run_lock(out):
        pass


def test_nonfinite_streak_stops_and_saves(train_overrides, monkeypatch, capsys):
    real = train_mod.token_nll
    monkeypatch.setattr(train_mod, "token_nll", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    cfg = config(train_overrides, "train.steps=10", "train.nonfinite=skip", "train.max_nonfinite_steps=3",
                 "train.log_every=1", "train.checkpoint_every=100")
    with pytest.raises(TrainingError, match=r"3 consecutive steps up to step 3 .* saved at step 3"):
        train(cfg)
    out = capsys.readouterr().out
    assert "skipped 1 non-finite" in out
    rows = [json.loads(line) for line in open(f"{cfg.train.out_dir}/metrics.jsonl")]
    losses = [r for r in rows if "step" in r and "loss" in r]
    assert [r["loss"] for r in losses] == [None] * 3 and all("loss" in r["nonfinite"] for r in losses)
    assert os.listdir(f"{cfg.train.out_dir}/checkpoints") == ["3"]


def test_unwritable_and_full_run_folders_are_refused_before_training(train_overrides, tmp_path, monkeypatch,
                                                                     capsys):
    (tmp_path / "afile").write_text("x")
    fails_in_process(train_main, argv(train_overrides, f"train.out_dir={tmp_path}/afile/run"), capsys,
                     "afile/run", "not writable", keep=(tmp_path / "afile",))
    out = Path(load_config("tiny", train_overrides).train.out_dir)
    monkeypatch.setattr(train_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    fails_in_process(train_main, argv(train_overrides, "train.steps=1"), capsys, "GiB free",
                     "one checkpoint needs about")
    assert not (out / "config.yml").exists() and not list(out.glob("checkpoints/*"))


def test_data_file_removed_mid_run(train_overrides, tmp_path):
    """Documents are read once at the start: a file that disappears later loses nothing."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(f"document {i} " * 200)
    cfg = config(train_overrides, "data.source=text", f"data.paths=[{docs}/*.txt]", "train.steps=3")

    def remove(step):
        if step == 1:
            shutil.rmtree(docs)
        return False

    summary = train(cfg, should_stop=remove)
    assert summary["step"] == 3 and load_run(cfg.train.out_dir)[2] == 3


KILL_DURING_SAVE = """
import os, signal, sys
import rdlm.checkpoint as ck
from rdlm.config import load_config
from rdlm.train import train
real = ck.TrainCheckpointer.save
def save(self, step, *args):
    real(self, step, *args)  # asynchronous: returns while the files are still being written
    if step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
ck.TrainCheckpointer.save = save
train(load_config("tiny", sys.argv[1:]))
"""


def test_sigkill_during_async_save_resumes_from_last_complete_step(train_overrides, capsys):
    cfg = config(train_overrides, "train.steps=4", "train.async_checkpoint=true")
    args = [*CORPUS, "data.val_fraction=0", "train.checkpoint_every=1", "train.steps=4", "train.async_checkpoint=true"]
    child = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *train_overrides, *args], env=ENV,
                           capture_output=True, text=True, cwd=REPO, timeout=600)
    assert child.returncode == -9, child.stderr[-2000:]
    checkpoints = Path(cfg.train.out_dir) / "checkpoints"
    complete = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    unfinished = [p.name for p in checkpoints.iterdir() if not p.name.isdigit()]
    summary = train(cfg)
    out = capsys.readouterr().out
    assert summary["start_step"] == max(complete) and summary["step"] == 4
    assert f"resumed from {checkpoints / str(max(complete))}" in out
    if unfinished:
        assert "ignored unfinished saves" in out and all(name in out for name in unfinished)


def test_saved_config_holds_absolute_paths_usable_from_any_folder(train_overrides, tokenizer_path, tmp_path,
                                                                  monkeypatch):
    shutil.copy(tokenizer_path, tmp_path / "tok.model")
    monkeypatch.chdir(tmp_path)
    overrides = [o for o in train_overrides if not o.startswith(("data.tokenizer", "train.out_dir"))]
    train(config(overrides, "data.tokenizer=tok.model", "train.out_dir=runs/rel", "train.steps=1"))
    saved = load_config(tmp_path / "runs/rel/config.yml")
    assert saved.data.tokenizer == str(tmp_path / "tok.model")
    assert saved.train.out_dir == str(tmp_path / "runs/rel")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from rdlm.inference.cli import main as generate_main
    assert generate_main(["--checkpoint", "../runs/rel", "--prompt", "To be", "--num-steps", "1",
                          "--max-new-tokens", "2"]) == 0


def test_metrics_never_hold_bare_nan(tmp_path):
    log = train_mod._Log(tmp_path / "m.jsonl", total=1, enabled=True)
    log.record(step=1, loss=float("nan"), grad_norm=float("inf"), lr=1e-3)
    log.close()
    row = json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert row == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3, "nonfinite": ["grad_norm", "loss"]}


def test_module_entry_points_print_no_runpy_warning():
    for module in ("rdlm.train", "rdlm.inference", "rdlm.convert"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], env=ENV, capture_output=True, text=True,
                             cwd=REPO, timeout=300)
        assert out.returncode == 0 and "RuntimeWarning" not in out.stderr and "WARNING" not in out.stderr, out.stderr
