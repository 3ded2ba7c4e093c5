"""Fault catalogue: HF directories and rdlm checkpoints, through `python -m rdlm.convert` (import and
export) and `rdlm.load_model`; relative paths work from any folder.

Each bad case ends in one `error:` line naming the file, tensor or key, exit 1, and changes nothing."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES
from faultlib import fails_in_process, snapshot

import rdlm
from rdlm.checkpoint import CheckpointError, load_model
from rdlm.convert import convert, main as convert_main

TINY = FIXTURES / "tiny_fp32"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """An rdlm checkpoint of the tiny official fixture (read-only for the tests: they copy it)."""
    dst = tmp_path_factory.mktemp("ck") / "tiny"
    convert(TINY, dst)
    return dst


def _hf_copy(tmp_path: Path) -> Path:
    src = tmp_path / "hf"
    shutil.copytree(TINY, src)
    return src


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


HF_SOURCES = {
    "missing": (lambda d: d / "nope", ["nope"]),
    "a file": (lambda d: (d / "file").write_text("x") and d / "file", ["file"]),
    "no config.json": (lambda d: (d / "empty").mkdir() or d / "empty", ["config.json"]),
    "config.json not JSON": (lambda d: (_hf_copy(d) / "config.json").write_text("{") and d / "hf", ["config.json"]),
    "wrong model_type": (lambda d: (_hf_copy(d) / "config.json").write_text(json.dumps(
        {**json.loads((TINY / "config.json").read_text()), "model_type": "llama"})) and d / "hf",
                         ["model_type='llama'", "huginn_raven"]),
    "unsupported injection": (lambda d: (_hf_copy(d) / "config.json").write_text(json.dumps(
        {**json.loads((TINY / "config.json").read_text()), "injection_type": "modulated"})) and d / "hf",
                              ["model.injection", "'modulated'", "linear"]),
    "no weights": (lambda d: [f.unlink() for f in _hf_copy(d).glob("*.safetensors")] and d / "hf", ["safetensors"]),
    "truncated weights": (lambda d: [_truncate(f) for f in _hf_copy(d).glob("*.safetensors")] and d / "hf",
                          ["model.safetensors", "truncated"]),
    "garbage weights": (lambda d: [f.write_bytes(b"\x00" * 64) for f in _hf_copy(d).glob("*.safetensors")]
                        and d / "hf", ["model.safetensors"]),
}


@pytest.mark.parametrize("case", HF_SOURCES)
def test_bad_hf_source(case, tmp_path, capsys):
    src = HF_SOURCES[case][0](tmp_path)
    dst = tmp_path / "out" / "ck"
    fails_in_process(convert_main, [str(src), str(dst)], capsys, *HF_SOURCES[case][1], keep=(tmp_path,))
    assert not dst.exists() and not list((tmp_path / "out").glob(".*partial*"))


def test_destination_that_is_or_holds_the_source_is_refused(tmp_path, capsys, monkeypatch):
    src = _hf_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    for dst in ("hf", ".", str(tmp_path)):
        fails_in_process(convert_main, ["hf", dst, "--overwrite"], capsys, "source", "delete the source",
                         keep=(tmp_path,))
    fails_in_process(convert_main, ["--export", str(src), "hf", "--overwrite"], capsys, "source", keep=(tmp_path,))


def test_existing_destination_and_unwritable_destination(tmp_path, capsys, converted):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    fails_in_process(convert_main, [str(TINY), str(tmp_path / "taken")], capsys, "already exists", "--overwrite",
                     keep=(tmp_path,))
    (tmp_path / "afile").write_text("x")
    fails_in_process(convert_main, [str(TINY), str(tmp_path / "afile" / "ck")], capsys, "afile", keep=(tmp_path,))
    fails_in_process(convert_main, ["--export", str(converted), str(tmp_path / "afile" / "hf")], capsys, "afile",
                     keep=(tmp_path,))


@pytest.mark.parametrize("args,needle", [(["--dtype", "float16"], "--dtype"), ([], "dst"), (["--bogus"], "--bogus")])
def test_bad_arguments_are_named(args, needle, capsys, tmp_path):
    fails_in_process(convert_main, [str(TINY), *([str(tmp_path / "x")] if args else []), *args], capsys, needle,
                     keep=(tmp_path,))


def _damage(kind: str, ck: Path) -> None:
    params = ck / "params"
    if kind == "truncated _METADATA":
        _truncate(next(params.rglob("_METADATA")))
    elif kind == "truncated array file":
        _truncate(max((f for f in params.rglob("d/*") if f.is_file()), key=lambda f: f.stat().st_size))
    elif kind == "missing array file":
        next(f for f in params.rglob("d/*") if f.is_file()).unlink()
    elif kind == "truncated manifest":
        _truncate(next(params.rglob("manifest.ocdbt")))
    elif kind == "corrupt files.json":
        (ck / "files.json").write_text("{")
    elif kind == "bad config.yml":
        (ck / "config.yml").write_text("model: {n_embd: [\n")
    elif kind == "config.yml of another shape":
        text = (ck / "config.yml").read_text()
        (ck / "config.yml").write_text(text.replace("n_embd: 32", "n_embd: 64"))
    elif kind == "no params":
        shutil.rmtree(params)
    elif kind == "empty directory":
        shutil.rmtree(ck)
        ck.mkdir()


DAMAGE = {
    "truncated _METADATA": ["_METADATA", "truncated"],
    "truncated array file": ["params/", "truncated"],
    "missing array file": ["params/", "is missing"],
    "truncated manifest": ["manifest.ocdbt", "truncated"],
    "corrupt files.json": ["files.json"],
    "bad config.yml": ["config.yml", "invalid YAML"],
    "config.yml of another shape": ["mis-shaped parameters", "expected [64]"],
    "no params": ["not an rdlm model checkpoint", "params/"],
    "empty directory": ["not an rdlm model checkpoint"],
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_checkpoint_is_named_by_load_and_export(kind, converted, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(converted, ck)
    _damage(kind, ck)
    with pytest.raises(CheckpointError) as error:
        load_model(ck)
    for needle in DAMAGE[kind]:
        assert needle in str(error.value), str(error.value)
    assert len(str(error.value).splitlines()) == 1
    fails_in_process(convert_main, ["--export", str(ck), str(tmp_path / "hf")], capsys, *DAMAGE[kind],
                     keep=(ck,))
    assert not (tmp_path / "hf").exists()


def test_relative_paths_from_another_folder(tmp_path, monkeypatch, capsys):
    """The README's commands with relative paths: convert, load, export, generate's loader."""
    from rdlm.inference import load_checkpoint

    shutil.copytree(TINY, tmp_path / "src")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert convert_main(["../src", "ck/tiny"]) == 0
    assert "converted ../src -> ck/tiny" in capsys.readouterr().out
    config, params = rdlm.load_model("ck/tiny")
    _, again = load_checkpoint("ck/tiny")
    assert convert_main(["--export", "ck/tiny", "hf-out"]) == 0
    _, exported = rdlm.load_hf_checkpoint("hf-out")
    for a, b in zip(*map(lambda t: __import__("jax").tree.leaves(t), (params, exported))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert config.model.n_embd == 32 and snapshot(work / "ck")


def test_converter_writes_the_file_list(converted):
    sizes = json.loads((converted / "files.json").read_text())
    assert sizes and all((converted / name).stat().st_size == size for name, size in sizes.items())


def test_save_model_round_trip_refuses_overwrite_and_leaves_nothing_on_failure(tmp_path):
    import jax

    from rdlm.checkpoint import save_model
    from rdlm.config import load_config
    from rdlm.params import init_params

    config = load_config("tiny")
    params = init_params(config.model, jax.random.key(0))
    save_model(tmp_path / "ckpt", config, params)
    loaded_config, loaded = load_model(tmp_path / "ckpt")
    assert loaded_config.model == config.model
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match="already exists"):
        save_model(tmp_path / "ckpt", config, params)
    with pytest.raises(Exception):
        save_model(tmp_path / "broken", config, {"not": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written checkpoint or staging folder
