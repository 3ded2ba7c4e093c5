"""Fault catalogue: config files, overrides and mesh settings, through `python -m rdlm.train`'s main.

Each case must end in one `error:` line naming the key, file or value and the valid choice, exit 1,
and leave the run folder unwritten."""

from pathlib import Path

import pytest
from faultlib import fails_in_process

from rdlm.config import ConfigError, load_config
from rdlm.train import main as train_main

# (overrides, words the message must contain)
OVERRIDES = [
    (["model.mean_recurence=4"], ["model.mean_recurence", "did you mean model.mean_recurrence"]),
    (["optim.lr=.nan"], ["optim.lr", "not a finite number", "(0, inf)"]),
    (["optim.lr=nan"], ["optim.lr", "expected float"]),
    (["optim.b1=.nan"], ["optim.b1", "[0, 1]"]),
    (["data.val_fraction=.nan"], ["data.val_fraction", "[0, 0.5]"]),
    (["model.norm_eps=.inf"], ["model.norm_eps", "(0, 1]"]),
    (["optim.lr=-1e-3"], ["optim.lr", "out of range (0, inf)"]),
    (["optim.b2=1.5"], ["optim.b2", "out of range [0, 1]"]),
    (["model.n_embd=[1,"], ["model.n_embd", "invalid YAML"]),
    (["model.n_embd=!!python/object/apply:os.system [echo]"], ["model.n_embd", "invalid YAML"]),
    (["train.async_checkpoint=on"], ["train.async_checkpoint", "expected bool"]),
    (["model.n_heads=3"], ["model.n_embd=32", "model.n_heads=3"]),
    (["model.n_embd=3.5"], ["model.n_embd", "expected int"]),
    (["train.steps=0"], ["train.steps", "[1, inf)"]),
    (["train.recurrence=uniform"], ["train.recurrence", "poisson-lognormal"]),
    (["model.dtype=float16"], ["model.dtype", "bfloat16"]),
    (["mesh.data=0"], ["mesh axis sizes", ">= 1 or -1"]),
    (["mesh.data=-1", "mesh.fsdp=-1"], ["at most one mesh axis may be -1"]),
    (["mesh.rules.heads=model"], ["mesh.rules.heads", "'model' is not a mesh axis"]),
    (["model=3"], ["model must be a mapping"]),
    (["model.n_embd.width=3"], ["model.n_embd is a value, not a section"]),
    (["model.n_embd"], ["'model.n_embd'", "section.key=value"]),
    (["=3"], ["section.key=value"]),
    (["train.seq_len=4096"], ["train.seq_len=4096", "model.block_size"]),
    (["train.batch_size=3", "train.grad_accum=2"], ["train.batch_size=3", "train.grad_accum=2"]),
    (["train.eval_recurrence=[1, -2]"], ["train.eval_recurrence", "integers >= 0"]),
    (["train.max_nonfinite_steps=0"], ["train.max_nonfinite_steps", "[1, inf)"]),
    (["data.packing=best_fit"], ["data.packing", "first_fit"]),
]


@pytest.mark.parametrize("overrides,needles", OVERRIDES, ids=[" ".join(o) for o, _ in OVERRIDES])
def test_bad_override(overrides, needles, tmp_path, capsys):
    run = tmp_path / "run"
    fails_in_process(train_main, ["tiny", *overrides, f"train.out_dir={run}"], capsys, *needles, keep=(run,))


def _write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


CONFIG_FILES = {
    "missing": (lambda d: d / "nope.yml", ["nope.yml", "does not exist"]),
    "directory": (lambda d: d, ["is not a file"]),
    "top-level list": (lambda d: _write(d / "list.yml", "- 1\n- 2\n"), ["list.yml", "top level must be a mapping"]),
    "top-level scalar": (lambda d: _write(d / "scalar.yml", "42\n"), ["scalar.yml", "top level must be a mapping"]),
    "invalid yaml": (lambda d: _write(d / "bad.yml", "model: {n_embd: [1,\n"), ["bad.yml", "invalid YAML"]),
    "binary": (lambda d: _write(d / "bin.yml", b"\xff\xfe\x00model"), ["bin.yml", "cannot be read"]),
    "section not a mapping": (lambda d: _write(d / "sec.yml", "model: 3\n"), ["sec.yml", "model "]),
    "unknown section": (lambda d: _write(d / "sec.yml", "modle: {}\n"), ["sec.yml", "did you mean model"]),
    "yaml tag": (lambda d: _write(d / "tag.yml", "model: !!python/name:os.system\n"), ["tag.yml", "invalid YAML"]),
    "unknown preset": (lambda d: "tinyy", ["unknown preset 'tinyy'", "tiny"]),
}


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_bad_config_file_with_and_without_overrides(case, tmp_path, capsys):
    make, needles = CONFIG_FILES[case]
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    source = make(cfg_dir)
    run = tmp_path / "run"
    for extra in ([], ["model.n_embd=64"]):
        fails_in_process(train_main, [str(source), *extra, f"train.out_dir={run}"], capsys, *needles,
                         keep=(cfg_dir, run))


def test_overrides_parse_as_users_write_them():
    cfg = load_config("tiny", ["optim.lr=1e-3", "train.out_dir=on", "data.tokenizer=123", "optim.b1=.5",
                               "train.async_checkpoint=false", "mesh.rules.batch=null", "data.paths=[a.txt, 1e-3]"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.b1 == 0.5
    assert cfg.train.out_dir == "on" and cfg.data.tokenizer == "123"  # a string key takes the text as written
    assert cfg.train.async_checkpoint is False and cfg.mesh.rules.batch is None
    assert cfg.data.paths == ("a.txt", 1e-3) or cfg.data.paths == ("a.txt", "1e-3")


def test_config_files_use_the_same_scalars(tmp_path):
    path = _write(tmp_path / "c.yml", "optim: {lr: 1e-3}\ntrain: {out_dir: on, async_checkpoint: no}\n")
    with pytest.raises(ConfigError, match="train.async_checkpoint: expected bool, got str 'no'"):
        load_config(path)
    _write(path, "optim: {lr: 1e-3}\ntrain: {out_dir: on}\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-3 and cfg.train.out_dir == "on"


MESHES = [
    (["mesh.data=3"], ["mesh", "3"]),
    (["mesh.data=1", "mesh.fsdp=16"], ["mesh", "16"]),
    (["mesh.data=1", "mesh.tensor=8", "model.n_heads=4", "model.n_embd=32"], ["tensor", "8"]),
]


@pytest.mark.parametrize("overrides,needles", MESHES, ids=[" ".join(o) for o, _ in MESHES])
def test_mesh_that_does_not_fit_the_devices(overrides, needles, train_overrides, tmp_path, capsys):
    run = tmp_path / "meshrun"
    fails_in_process(train_main, ["tiny", *train_overrides, *overrides, f"train.out_dir={run}"], capsys, *needles)
    assert not (run / "config.yml").exists() and not list((run / "checkpoints").glob("*"))


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # e.g. a run folder called demo
    assert load_config("demo").model.n_embd == 128
