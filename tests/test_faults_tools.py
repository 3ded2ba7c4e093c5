"""Fault catalogue of the tools' command lines: tools/bench.py and tools/train_tokenizer.py arguments and
configs. Each bad command line ends in one `error:` line naming the flag or key and the valid range,
exit code 1, and changes nothing on disk."""

from pathlib import Path

import pytest

from conftest import REPO
from faultlib import fails_in_child, fails_in_process, run_cli
from test_faults_data import load_tool

BENCH_CASES = {
    "--batch 0": (["forward", "tiny", "--batch", "0"], ["argument --batch: '0' is not an integer >= 1"]),
    "--seq -1": (["train", "tiny", "--seq", "-1"], ["argument --seq: '-1' is not an integer >= 1"]),
    "--seq past block_size": (["forward", "tiny", "--seq", "33"], ["--seq 33 exceeds model.block_size=32"]),
    "--seq + --new past block_size": (["decode", "tiny", "--seq", "30", "--new", "3"],
                                      ["--seq 30 + --new 3 = 33 exceeds model.block_size=32"]),
    "--steps with 0": (["forward", "tiny", "--steps", "4,0"], ["argument --steps: '0' is not an integer >= 1"]),
    "--steps not a list": (["train", "tiny", "--steps", "4;8"], ["argument --steps: '4;8' is not an integer >= 1"]),
    "--iters 0": (["forward", "tiny", "--iters", "0"], ["argument --iters: '0' is not an integer >= 1"]),
    "--new 1": (["decode", "tiny", "--new", "1"], ["argument --new: '1' is not an integer >= 2"]),
    "--batches 0": (["decode", "tiny", "--batches", "1,0"], ["argument --batches: '0' is not an integer >= 1"]),
    "--shards 0": (["convert", "tiny", "--shards", "0"], ["argument --shards: '0' is not an integer >= 1"]),
    "--devices 0": (["memory", "tiny", "--devices", "0"], ["argument --devices: '0' is not an integer >= 1"]),
    "--devices unlike jax": (["memory", "tiny", "--devices", "3"],
                             ["--devices 3: jax runs on", "virtual devices are CPU ones"]),
    "--dev abbreviated": (["memory", "tiny", "--dev", "3"], ["unrecognized arguments: --dev 3"]),
    "--workdir missing": (["convert", "tiny", "--workdir", "{d}/nowhere"], ["argument --workdir: ", "nowhere",
                                                                           "is not an existing directory"]),
    "--criteria unknown": (["decode", "tiny", "--seq", "4", "--new", "4", "--criteria", "kl,fast"],
                           ["--criteria: unknown fast; valid: entropy-diff, latent-diff, kl"]),
    "--dtype unknown": (["convert", "tiny", "--dtype", "fp8"], ["argument --dtype: invalid choice: 'fp8'"]),
    "unknown bench": (["speed", "tiny"], ["argument bench: invalid choice: 'speed'"]),
    "--official-python alone": (["forward", "tiny", "--official-python", "python"],
                                ["--official-python and --official-script go together"]),
    "unknown config key": (["forward", "tiny", "model.n_layer=2"], ["unknown config key 'model.n_layer'"]),
    "bad preset": (["forward", "tinyy"], ["unknown preset 'tinyy'", "tiny"]),
    "value out of range": (["forward", "tiny", "model.n_heads=0"], ["model.n_heads: 0 is out of range [1, inf)"]),
}


@pytest.mark.parametrize("argv, needles", BENCH_CASES.values(), ids=BENCH_CASES.keys())
def test_bench_arguments(argv, needles, tmp_path, capsys):
    argv = [a.format(d=tmp_path) for a in argv]
    fails_in_process(load_tool("bench").main, argv, capsys, *needles, keep=(tmp_path, REPO / "configs"))


# --devices is read before jax is imported: only a fresh interpreter shows what happens to it.
@pytest.mark.parametrize("flag, needles", [
    (["--devices"], ["argument --devices: expected one argument"]),
    (["--devices=x"], ["argument --devices: 'x' is not an integer >= 1"]),
    (["--devices=-2"], ["argument --devices: '-2' is not an integer >= 1"]),
])
def test_bench_devices_flag_in_a_child(flag, needles, tmp_path):
    fails_in_child(["tools/bench.py", "memory", "tiny", *flag], *needles, keep=(tmp_path,))


@pytest.mark.parametrize("argv, expected", [
    (["memory", "tiny", "--devices", "4"], 4), (["memory", "--devices=8", "tiny"], 8),
    (["memory", "--devices=2", "--devices", "3"], 3), (["memory", "--devices"], None), (["--devices=0"], None),
    (["--devices", "--batch"], None),
])
def test_bench_reads_both_devices_forms(argv, expected):
    assert load_tool("bench").virtual_devices(argv) == expected


def test_bench_devices_equals_form_reaches_jax():
    """`--devices=3` sets the virtual device count before jax starts (it used to be ignored)."""
    out = run_cli(["-c", "import sys; sys.argv = ['bench.py', 'memory', 'tiny', '--devices=3']; "
                   "sys.path.insert(0, 'tools'); import bench, jax; print(jax.device_count())"])
    assert out.returncode == 0 and out.stdout.split() == ["3"], out.stderr[-2000:]


TOKENIZER_ARG_CASES = {
    "--vocab-size 0": (["--vocab-size", "0"], ["--vocab-size 0 is out of range [260, model.vocab_size=512]"]),
    "--vocab-size negative": (["--vocab-size", "-5"], ["--vocab-size -5 is out of range [260, "]),
    "--vocab-size past the model": (["--vocab-size", "600"], ["--vocab-size 600 is out of range [260, "
                                                              "model.vocab_size=512]"]),
    "model too small": (["model.vocab_size=256", "--vocab-size", "256"],
                        ["--vocab-size 256 is out of range", "raise model.vocab_size to at least 260"]),
    "--vocab-size not a number": (["--vocab-size", "many"], ["argument --vocab-size: invalid int value: 'many'"]),
    "--vocab-size missing": (["--out", "{d}/tok"], ["the following arguments are required: --vocab-size"]),
    "--out under a file": (["--vocab-size", "300", "--out", "{d}/file.txt/tok"],
                           ["--out ", "file.txt/tok: cannot write there", "is not a writable directory"]),
    "--out a directory": (["--vocab-size", "300", "--out", "{d}"], ["is a directory; --out is a file prefix",
                                                                     "/tokenizer"]),
    "bad override": (["data.val_fractoin=0", "--vocab-size", "300"], ["unknown config key 'data.val_fractoin'"]),
    "bad data source": (["data.source=csv", "--vocab-size", "300"], ["data.source: 'csv' is not one of"]),
}


@pytest.mark.parametrize("argv, needles", TOKENIZER_ARG_CASES.values(), ids=TOKENIZER_ARG_CASES.keys())
def test_train_tokenizer_arguments(argv, needles, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("a file")
    argv = ["tiny", "model.vocab_size=512", *(a.format(d=tmp_path) for a in argv)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "tok")]
    fails_in_process(load_tool("train_tokenizer").main, argv, capsys, *needles, keep=(tmp_path,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_train_tokenizer_keeps_the_old_model_when_training_fails(tmp_path, capsys):
    """A failed run leaves an earlier OUT.model as it was; a successful one replaces it."""
    (tmp_path / "one.txt").write_text("To be or not to be, that is the question.")
    main = load_tool("train_tokenizer").main
    argv = ["tiny", "model.vocab_size=512", "data.source=text", f"data.paths=[{tmp_path}/one.txt]",
            "data.val_fraction=0", "--out", str(tmp_path / "tok")]
    assert main([*argv, "--vocab-size", "300"]) == 0
    assert "wrote" in capsys.readouterr().out
    fails_in_process(main, [*argv, "--vocab-size", "500"], capsys, "too little text for 500 pieces",
                     keep=(tmp_path,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.txt", "tok.model", "tok.vocab"]


def test_make_hf_tokenizer_out_under_a_file(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("a file")
    fails_in_process(load_tool("make_hf_tokenizer").main, ["--out", str(tmp_path / "file.txt" / "hf")], capsys,
                     "Not a directory", "file.txt", keep=(tmp_path,))


@pytest.mark.parametrize("script", ["tools/make_hf_tokenizer.py", "experiments/recurrence_sweep.py",
                                    "experiments/tiny_parity.py"])
def test_scripts_name_a_bad_flag(script, tmp_path, capsys):
    """Every script parses with rdlm's ArgumentParser: one `error:` line, exit 1, no usage block."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(script.replace("/", "_")[:-3], REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fails_in_process(module.main, ["--bogus"], capsys, "unrecognized arguments: --bogus",
                     f"{Path(script).name} --help", keep=(tmp_path,))
