"""Fault catalogue of generation: bad prompts, settings, checkpoints, tokenizers, overrides and meshes each end
in one named error (CLI: exit 1, an `error:` line naming the flag, key or file and the valid choice, no
traceback; API: GenerateError) before anything is compiled, and change nothing on disk."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import rdlm
from conftest import FIXTURES, REPO
from faultlib import fails_in_process

from rdlm.inference import engine, memory
from rdlm.inference.checks import GenerateError
from rdlm.inference.cli import main as generate_main
from rdlm.sharding import make_mesh
TINY, TOK = FIXTURES / "tiny_fp32", FIXTURES / "hf_tokenizer"
BASE = ["--tokenizer", str(TOK), "--num-steps", "2", "--max-new-tokens", "2"]
GIB = 2**30


@pytest.fixture
def cases(tmp_path: Path) -> Path:
    """Broken checkpoint directories: empty, a file, config.json alone, a run folder without checkpoints, an
    rdlm checkpoint with invalid YAML, an HF directory with a junk safetensors file."""
    for d in ["empty", "hf_config_only", "run", "bad_yaml/params", "junk_hf"]:
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "a_file").write_text("not a checkpoint")
    shutil.copy(TINY / "config.json", tmp_path / "hf_config_only")
    shutil.copy(REPO / "configs" / "tiny.yml", tmp_path / "run" / "config.yml")
    (tmp_path / "bad_yaml" / "config.yml").write_text("model: [\n")
    shutil.copy(TINY / "config.json", tmp_path / "junk_hf")
    (tmp_path / "junk_hf" / "model.safetensors").write_text("junk")
    return tmp_path


# (argv after `--checkpoint TINY` + BASE, needles); SETTINGS, OVERRIDES and MESHES cases get `--prompt hi` too.
PROMPTS = [
    (["--prompt", ""], ["prompt 0", "is empty"]),
    (["--prompt", "hi", "--prompt", "  \n"], ["prompt 1", "is empty"]),
    (["--prompt", "\u00e9\u00e9"], ["prompt 0", "encodes to no tokens", "tokenizer.json"]),
    (["--prompt", "to be or not " * 6], ["--max-new-tokens=2", "exceeds the context block_size=32"]),
]
SETTINGS = [
    (["--num-steps", "0"], ["--num-steps=0 is out of range", "[1, 2147483647]"]),
    (["--num-steps", str(2**31)], ["--num-steps=2147483648 is out of range", "[1, 2147483647]"]),
    (["--num-steps", "abc"], ["argument --num-steps", "invalid int value: 'abc'"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens=0 is out of range", "[1, 31]"]),
    (["--temperature", "nan"], ["--temperature=nan is not a finite number", "[0.0, inf)"]),
    (["--temperature", "-1"], ["--temperature=-1.0 is out of range", "[0.0, inf)"]),
    (["--top-p", "inf"], ["--top-p=inf is not a finite number", "(0.0, 1.0]"]),
    (["--top-k", "300"], ["--top-k=300 is out of range", "[0, 256]"]),
    (["--min-p", "1.5"], ["--min-p=1.5 is out of range", "[0.0, 1.0]"]),
    (["--init-scale=-inf"], ["--init-scale=-inf is not a finite number", "[0.0, 1000000.0]"]),
    (["--exit-criterion", "kl", "--exit-threshold", "nan"], ["--exit-threshold for kl=nan", "(0.0, inf)"]),
    (["--exit-threshold", "0.1"], ["--exit-threshold was given without an --exit-criterion"]),
    (["--exit-criterion", "entropy"], ["argument --exit-criterion", "'entropy'", "entropy-diff"]),
    (["--cache-strategy", "latest"], ["--cache-strategy='latest'", "valid: full, skip"]),
    (["--cache-strategy", "compress-s6"], ["--cache-strategy='compress-s6'", "multiple of the core depth 4"]),
    (["--draft-steps", "5"], ["--draft-steps=5 is out of range", "[1, 2]"]),
    (["--draft-steps", "1", "--lookahead", "0"], ["--lookahead=0 is out of range", "[1, 32]"]),
    (["--draft-steps", "1", "--verification-threshold", "nan"], ["--verification-threshold=nan", "(0.0, 1.0]"]),
    (["--draft-steps", "1", "--continuous"], ["(--draft-steps) does not combine with --exit-criterion or "
                                              "--continuous"]),
    (["--seed", str(2**64)], ["--seed=18446744073709551616 is out of range", "9223372036854775807]"]),
]
OVERRIDES = [
    (["model.foo=1"], ["unknown config key 'model.foo'", "model.n_embd"]),
    (["model.dtype=float99"], ["model.dtype", "'float99'", "float32"]),
    (["model.dtype"], ["'model.dtype'", "section.key=value"]),
    (["model.n_embd=64"], ["model.n_embd=64", "change parameter shapes", "model.dtype"]),
]
MESHES = [  # 8 virtual CPU devices (conftest)
    (["--sharded", "mesh.data=3"], ["mesh {'data': 3", "needs 3 devices, 8 are available"]),
    (["--sharded", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=3"], ["'tensor': 3", "8 devices are not divisible"]),
    (["--sharded", "mesh.data=1", "mesh.tensor=8"], ["heads, size 4", "tensor", "mesh.rules.heads=null"]),
    (["--sharded"], ["1 prompt(s)", "('data', 'fsdp')", "8 ways", "mesh.rules.batch=null"]),
    (["--sharded", "mesh.rules.batch=model"], ["mesh.rules.batch", "'model' is not a mesh axis"]),
]


@pytest.mark.parametrize("extra,needles", PROMPTS + [([*a, "--prompt", "hi"], n)
                                                     for a, n in SETTINGS + OVERRIDES + MESHES])
def test_cli_refuses_bad_input(extra, needles, capsys):
    fails_in_process(generate_main, ["--checkpoint", str(TINY), *BASE, *extra], capsys, *needles, keep=(TINY, TOK))


@pytest.mark.parametrize("checkpoint,needles", [
    ("missing", ["checkpoint", "missing", "does not exist"]),
    ("a_file", ["a_file", "is not a directory"]),
    ("empty", ["empty holds no checkpoint", "config.json + *.safetensors"]),
    ("hf_config_only", ["hf_config_only", "no model.safetensors"]),
    ("run", ["run/checkpoints", "checkpoint"]),
    ("bad_yaml", ["bad_yaml/config.yml", "invalid YAML"]),
    ("junk_hf", ["junk_hf/model.safetensors", "not a safetensors file"]),
])
def test_cli_refuses_bad_checkpoints(cases, checkpoint, needles, capsys):
    """Nothing is written, not even an empty directory (a run's checkpoints/, say)."""
    tree = sorted(cases.rglob("*"))
    fails_in_process(generate_main, ["--checkpoint", str(cases / checkpoint), *BASE, "--prompt", "hi"], capsys, *needles,
                     keep=(cases,))
    assert sorted(cases.rglob("*")) == tree


@pytest.mark.parametrize("tokenizer,needles", [
    (None, ["no tokenizer found", f"tokenizer.json or tokenizer.model in {TINY}", "data.tokenizer"]),
    ("missing", ["tokenizer path=", "missing", "is not a file"]),
    ("a_file", ["a_file", "cannot read a sentencepiece model"]),
])
def test_cli_refuses_bad_tokenizers(cases, tokenizer, needles, capsys):
    tok = [] if tokenizer is None else ["--tokenizer", str(cases / tokenizer)]
    fails_in_process(generate_main, ["--checkpoint", str(TINY), *tok, "--prompt", "hi"], capsys, *needles,
                     keep=(cases, TINY))


def test_cli_refuses_a_tokenizer_larger_than_the_model(tokenizer_path, capsys):
    fails_in_process(generate_main, ["--checkpoint", str(TINY), "--tokenizer", tokenizer_path, "--prompt", "hi"], capsys,
                     tokenizer_path, "512 token ids", "model.vocab_size=256", keep=(TINY, Path(tokenizer_path)))


def test_cli_refuses_a_call_that_does_not_fit_in_memory(monkeypatch, capsys):
    """A million recurrences keep a million cache slots per core layer: refused before compiling, with what fits."""
    monkeypatch.setattr(memory, "available_bytes", lambda devices: GIB)
    err = fails_in_process(generate_main, ["--checkpoint", str(TINY), *BASE, "--num-steps", "1000000", "--prompt", "hi"],
                           capsys, "needs about", "GiB", "1 GiB free", "--cache-strategy='full'",
                           "--cache-strategy compress-anchor or compress-s4", "--num-steps <= ", keep=(TINY, TOK))
    fits = int(err.split("--num-steps <= ")[1].split()[0])
    assert 1000 < fits < 1000000


# ---- the API -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return rdlm.load_hf_checkpoint(TINY)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=float("inf")), "temperature=inf is not a finite number; valid range is [0.0, inf)"),
    (dict(top_p=float("nan")), "top_p=nan is not a finite number; valid range is (0.0, 1.0]"),
    (dict(min_p=np.float32("nan")), "min_p=nan is not a finite number"),
    (dict(top_k=True), "top_k=True must be an integer in [0, 256]"),
    (dict(num_steps=10**400), "is out of range; valid range is [1, 2147483647]"),
    (dict(draft_steps=1, verification_threshold=float("nan")), "verification_threshold=nan is not a finite number"),
    (dict(input_ids=[[1, 2], []]), "empty prompt"),
])
def test_api_refuses_bad_settings(tiny, kwargs, message):
    cfg, params = tiny
    call = dict(input_ids=[[1, 2, 3]], max_new_tokens=2, num_steps=2) | kwargs
    with pytest.raises(GenerateError) as e:
        rdlm.generate(params, call.pop("input_ids"), cfg, **call)
    assert message in str(e.value)


def test_api_refuses_a_batch_the_mesh_cannot_split(tiny):
    from rdlm.config import MeshConfig
    cfg, params = tiny
    mesh = make_mesh(MeshConfig(data=4), jax.devices()[:4])
    with pytest.raises(GenerateError, match=r"2 prompt\(s\) do not split .* \(4 ways\); pass a multiple of 4"):
        rdlm.generate(params, [[1, 2], [3]], cfg, max_new_tokens=2, num_steps=2, mesh=mesh)


def test_api_memory_check_names_what_fits(tiny, monkeypatch):
    """Needed and free figures; every strategy named fits by the same estimate, and num_steps is the largest."""
    cfg, params = tiny
    need = memory.generation_bytes(cfg, engine.Spec(num_steps=1000, max_new_tokens=2), 1, 16, 18)
    monkeypatch.setattr(memory, "available_bytes", lambda devices: need // 2)
    with pytest.raises(GenerateError) as e:
        rdlm.generate(params, [[1, 2, 3]], cfg, max_new_tokens=2, num_steps=1000)
    message = str(e.value)
    assert f"needs about {need / GIB:.3g} GiB" in message and f"{need // 2 / GIB:.3g} GiB free" in message

    def fits(strategy="full", steps=1000):
        return memory.generation_bytes(cfg, engine.Spec(steps, 2, strategy=strategy), 1, 16, 18) <= need // 2
    largest = int(message.split("compress-s4 up to compress-s")[1].split()[0])
    assert fits(f"compress-s{largest}") and not fits(f"compress-s{largest + 4}") and fits("compress-anchor")
    steps = int(message.split("num_steps <= ")[1].split()[0])
    assert fits(steps=steps) and not fits(steps=steps + 1)


def test_api_reports_running_out_of_memory_anyway(tiny, monkeypatch):
    """XLA's temporaries can exceed the estimate: its RESOURCE_EXHAUSTED becomes a GenerateError with a hint."""
    cfg, params = tiny

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 57 GB.\nmore")
    monkeypatch.setattr(engine, "decode", exhausted)
    with pytest.raises(GenerateError, match="out of memory while generating: RESOURCE_EXHAUSTED: .* 57 GB.$") as e:
        rdlm.generate(params, [[1, 2, 3]], cfg, max_new_tokens=2, num_steps=2)
    assert "compress-anchor" in e.value.hint


class FakeDevice:
    platform, device_kind = "gpu", "H200"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_available_bytes_from_device_stats_or_the_host(monkeypatch):
    gpus = [FakeDevice({"bytes_limit": 10 * GIB, "bytes_in_use": 3 * GIB}), FakeDevice({"bytes_limit": 10 * GIB})]
    assert memory.available_bytes(gpus) == 17 * GIB
    monkeypatch.setattr(memory, "_host_available_bytes", lambda: 5 * GIB)
    assert memory.available_bytes([FakeDevice(None)]) == 5 * GIB  # CPU devices report nothing
    monkeypatch.undo()
    assert 0 < memory.available_bytes(jax.devices()[:1]) < 2**50
