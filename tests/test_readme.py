"""The README's commands, run as a user runs them: from another working directory, with relative paths.

Every command line of README.md's shell blocks (```bash blocks, and `python ...`/`make ...` lines of plain
``` blocks) is either run here or listed in SKIP with the reason; `test_every_readme_command_is_run_or_skipped`
fails on a command that is in neither (or in both), so a command added to the README cannot go untested.

How a command is run:
- its `\\` continuations are joined, a trailing `# comment` dropped, and each `[--flag ...]` /
  `[key=value]` bracket (an optional part) taken out of the base command; the optional parts are run as the
  variants of RUN name (every optional part must be in one variant);
- the placeholders of PLACEHOLDERS are replaced by paths that exist here, all of them RELATIVE; the
  comparison with the official code (`--official-python $TORCH_PY --official-script $OFFICIAL_BENCH`) runs
  when both variables are set, and is dropped otherwise (the rest of the command still runs);
- the `extra` arguments of its RUN entry are appended (argparse and `key=value` overrides keep the last
  value), which turns a long run into a seconds-long one on CPU; each has its reason;
- `python -m rdlm.x` runs as `sys.executable -m rdlm.x` with PYTHONPATH=repo (as after `pip install -e .`),
  `python tools/x.py` as `sys.executable <relative path from the working directory to the repo's tools/x.py>`;
- the working directory is a temporary folder outside the repo; commands of one test share it and run in
  README order, so `convert` writes what `generate` and `--export` then read.

A failing command does not stop the others of its test: each test reports all its failures at the end.
The tests that run commands are marked slow (about 2.5 CPU-minutes in all); CI runs them too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO

README = REPO / "README.md"

# -- the tables -------------------------------------------------------------------------------------------

# README placeholder -> what it is replaced with (relative to the working directory); the test makes each.
PLACEHOLDERS = {
    # the hub's huginn-0125 directory: a copy of the official tiny checkpoint (tests/fixtures/tiny_fp32, same
    # file layout) with the tiny HF tokenizer files (tests/fixtures/hf_tokenizer) beside it, as on the hub
    "path/to/huginn-0125": "hub/huginn-0125",
    # the export's output directory (does not exist before)
    "path/to/hf-out": "export/hf-out",
    # a path inside the checkout, written relative to its root: relative to the working directory instead
    "tests/fixtures/tiny_fp32": "<relative path to the repo>/tests/fixtures/tiny_fp32",
    "experiments/recurrence_depth.yml": "<relative path to the repo>/experiments/recurrence_depth.yml",
}
# `--official-python $TORCH_PY --official-script $OFFICIAL_BENCH` needs torch, transformers and the official
# code (kept outside the repo): expanded when both variables are set, else dropped (ours runs alone).
OFFICIAL_FLAGS = "--official-python $TORCH_PY --official-script $OFFICIAL_BENCH"

# the `demo` preset (900 steps, batch 16 x 128) -> 2 steps of batch 2 x 32, evaluation and checkpoint at step 2
TINY_DEMO_TRAIN = ("train.steps=2 train.batch_size=2 train.seq_len=32 train.log_every=1 train.eval_every=2 "
                   "train.eval_batches=1 train.checkpoint_every=2 data.prefetch=0")
# huginn-0125's shapes -> tiny widths and 1 core layer (a bench of the released size on CPU takes minutes)
TINY_SHAPES = ("model.n_embd=64 model.n_heads=2 model.intermediate_size=128 model.vocab_size=512 "
               "model.n_layers_in_recurrent_block=1")
# bench decode: 1 batch size, 1 depth, 1 criterion, 1 timed call (each combination is a compile)
TINY_DECODE = "--batches 1 --steps 8 --criteria none --iters 1 --new 4"


@dataclasses.dataclass(frozen=True)
class Run:
    test: str  # the test that runs it (with that test's other commands, in README order)
    extra: str = ""  # appended to the command: a short CPU run
    why: str = ""  # the reason for `extra`
    # one run per variant: the README's optional parts (and any flag they need here) added to the base command
    variants: tuple[tuple[str, ...], ...] = ((),)
    expect: str = ""  # printed on stdout by a successful run


# README command (regex, matched at the start of the joined command text) -> how it is run.
RUN = {
    r"python -m rdlm\.convert path/to/huginn-0125 ckpt/huginn-0125": Run(
        "checkpoint", variants=((), ("--dtype bfloat16", "--overwrite"))),  # the 2nd replaces the 1st's DST
    r"python -m rdlm\.convert --export ckpt/huginn-0125 path/to/hf-out": Run("checkpoint"),
    r"python -m rdlm\.inference --checkpoint ckpt/huginn-0125": Run(
        "checkpoint", extra="--max-new-tokens 3",
        why="the tiny fixture's block_size is 32 and the chat-formatted prompt takes 29 of it",
        # two runs: speculative decoding does not combine with an exit criterion or continuous thought
        variants=(("--exit-criterion entropy-diff", "--cache-strategy latest-m4", "--continuous",
                   "--temperature 0.7 --top-k 50 --top-p 0.9 --min-p 0.05 --seed 1", "--max-new-tokens 64",
                   "--sharded", "model.dtype=bfloat16"),
                  ("--draft-steps 4 --lookahead 4",)),
        expect="recurrence steps per token"),
    r"python tools/train_tokenizer\.py demo": Run("training", expect="1024 pieces"),
    r"python -m rdlm\.train demo": Run("training", extra=TINY_DEMO_TRAIN, why="900 steps of 16 x 128 take 5 min",
                                       expect="val r=1"),
    r"python experiments/recurrence_sweep\.py runs/demo": Run(
        "training", extra="--batches 2 --sample-tokens 8", why="16 batches and an 80-token sample: 2 of each suffice",
        expect="recurrence_sweep.png"),
    r"python tools/bench\.py decode demo --checkpoint runs/demo": Run(
        "training", extra=TINY_DECODE, why="2 batch sizes x 2 depths x 7 criteria are ~20 compiles",
        expect='"decode_tokens_per_s"'),
    r"python -m rdlm\.sweep experiments/recurrence_depth\.yml --dry-run": Run("experiments", expect="[6/6]"),
    r"python experiments/arithmetic\.py runs/arithmetic/data": Run(
        "experiments", extra="--train 300 --test 8", why="60,000 problems take a while to tokenize; 300 suffice",
        expect="training problems"),
    r"python -m rdlm\.train arithmetic": Run("experiments", extra=TINY_DEMO_TRAIN, why="3000 steps take 25 min",
                                            expect="val r=1"),
    r"python -m rdlm\.evaluate --checkpoint runs/arithmetic": Run(
        "experiments", extra="--recurrence 1,2 --criteria entropy-diff --batch-size 4",
        why="7 depths x 2 sets of 500 problems: 2 depths of the 8-problem sets", expect="| r=2 |"),
    r"python tools/tpu/tpu\.py ": Run("tpu", extra="--dry-run", why="needs gcloud and a TPU project; --dry-run "
                                      "prints the exact gcloud commands", expect="gcloud "),
    r"python tools/bench\.py memory huginn_0125 --topology": Run(
        "bench", expect='"skipped"' if importlib.util.find_spec("libtpu") is None else '"temp_bytes"',
        variants=((), ("train.param_dtype=bfloat16", "train.remat=full"))),
    r"python tools/bench\.py flops huginn_0125": Run("bench", expect='"tokens_per_s_per_chip"'),
    r"python tools/bench\.py memory huginn_0125 --devices 8": Run(
        "bench", extra=TINY_SHAPES + " model.mean_backprop_depth=2",
        why="compiling the 3.56B-parameter step for 8 virtual CPU devices takes minutes: tiny widths, 1 core "
            "layer, 2 grad steps",
        expect='"temp_bytes"'),
    r"python tools/bench\.py convert huginn_0125 --dtype bfloat16 --shards 4 --keep": Run(
        "bench", extra=TINY_SHAPES, why="a 7.8 GB checkpoint of 3.56B random values takes minutes: tiny widths",
        expect='"peak_rss_gib"'),
    r"python tools/bench\.py decode huginn_0125 --checkpoint": Run(
        "bench", extra="--steps 4", why="32 recurrences of the (tiny) converted checkpoint add a compile",
        expect='"peak_rss_gib"'),
    r"python tools/bench\.py forward tiny model\.mean_recurrence=16": Run(
        "bench", extra="--steps 4 --iters 1", why="one depth, one timed call", expect='"tokens_per_s"'),
    r"python tools/bench\.py decode tiny --checkpoint tests/fixtures/tiny_fp32": Run(
        "bench", extra=TINY_DECODE, why="one timed call", expect='"decode_tokens_per_s"'),
    r"python tools/bench\.py forward tiny --official-python": Run(
        "bench", extra="--steps 4 --iters 1", why="one depth, one timed call", expect='"tokens_per_s"'),
    r"python tools/bench\.py forward tiny model\.n_embd=512": Run(
        "bench", extra="--steps 2 --iters 1", why="64 recurrences at width 512 run for a minute",
        expect='"tokens_per_s"'),
}

TESTS = {"checkpoint", "training", "tpu", "bench", "experiments"}  # the tests below that run commands, by their Run.test name

# README command (regex at the start) -> why it is not run here.
SKIP = {
    r"make demo$": "trains the demo for 900 steps (6.5 min); its three commands are the Training block's, run "
                   "here with tiny overrides",
    r"make test$": "runs the whole test suite, this file included",
    r"python -m rdlm\.sweep experiments/recurrence_depth\.yml$": "six 600-step trainings (about 40 min here); "
                                                                  "tests/test_sweep.py runs a two-point sweep end to end",
    r"python -m rdlm\.harness run --model rdlm --tasks arc_easy": "arc_easy and gsm8k come from the HF hub; "
                                                                  "tests/test_harness.py runs this command line on "
                                                                  "local tasks",
}


# -- reading the README -----------------------------------------------------------------------------------

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
COMMAND_LINE = re.compile(r"^(?:[A-Z_]+=\S*\s+)*(?:python3?|make)\s")
OPTIONAL = re.compile(r"(?:(?<=\s)|^)\[((?:--|[a-z_]+\.[a-z_.]+=)[^\[\]]*)\]")


@dataclasses.dataclass(frozen=True)
class Command:
    text: str  # continuations joined, comment dropped, spaces collapsed
    line: int  # README line where it starts
    section: str  # the `## ` heading above it

    @property
    def optional(self) -> tuple[str, ...]:
        return tuple(m.group(1).strip() for m in OPTIONAL.finditer(self.text))

    @property
    def base(self) -> str:
        return " ".join(OPTIONAL.sub(" ", self.text).split())

    def __str__(self):
        return f"README.md:{self.line} ({self.section}): {self.text}"


def _strip_comment(line: str) -> str:
    """`cmd args  # comment` -> `cmd args`; a `#` inside quotes or a word stays."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def readme_commands(text: str | None = None) -> list[Command]:
    text = README.read_text() if text is None else text
    commands = []
    for block in FENCE.finditer(text):
        lang, body = block.group(1), block.group(2)
        if lang not in ("bash", "sh", "shell", ""):
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        section = ([m for m in re.findall(r"^## (.+)$", text[:block.start()], re.M)] or ["(top)"])[-1]
        lines = body.split("\n")
        i = 0
        while i < len(lines):
            start, joined = i, lines[i]
            while joined.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                joined = joined.rstrip()[:-1] + " " + lines[i]
            i += 1
            joined = " ".join(_strip_comment(joined).split())
            if not joined or (lang == "" and not COMMAND_LINE.match(joined)):
                continue  # plain blocks also hold tables and samples: only their command lines count
            commands.append(Command(joined, first + start, section))
    return commands


def _entries(command: Command, table: dict) -> list[str]:
    return [pattern for pattern in table if re.match(pattern, command.text)]


# -- running ---------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    # conftest gives this process 8 virtual CPU devices; a user's shell has one
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _substitute(text: str, cwd: Path) -> str:
    for placeholder, path in PLACEHOLDERS.items():
        if path.startswith("<relative path to the repo>"):
            path = os.path.relpath(REPO / placeholder, cwd)
        text = re.sub(rf"(?<![\w/.-]){re.escape(placeholder)}(?![\w.-])", lambda _: path, text)
    torch_py, official = os.environ.get("TORCH_PY"), os.environ.get("OFFICIAL_BENCH")
    if torch_py and official:
        text = text.replace("$TORCH_PY", torch_py).replace("$OFFICIAL_BENCH", official)
    else:
        text = text.replace(OFFICIAL_FLAGS, " ")
    assert "$" not in text, f"unexpanded variable in {text!r}: add it to the substitutions of tests/test_readme.py"
    return text


def _argv(text: str, cwd: Path) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(text)
    env = {}
    while re.match(r"^[A-Z_]+=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] in ("python", "python3"), f"not a python command: {text!r} (run it, or add it to SKIP)"
    if words[1] != "-m":  # a script of the checkout, reached from the working directory by a relative path
        words[1] = os.path.relpath(REPO / words[1], cwd)
        assert not os.path.isabs(words[1])
    return env, [sys.executable, *words[1:]]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_commands(test: str, cwd: Path) -> None:
    assert not cwd.resolve().is_relative_to(REPO.resolve()), "the working directory must be outside the repo"
    commands = [(c, RUN[_entries(c, RUN)[0]]) for c in readme_commands() if _entries(c, RUN)
                and RUN[_entries(c, RUN)[0]].test == test]
    assert commands, f"no README command is run by the test {test!r}"
    failures, report = [], []
    for command, run in commands:
        for variant in run.variants:
            text = " ".join([command.base, *variant, run.extra])
            text = _substitute(text, cwd)
            env, argv = _argv(text, cwd)
            given = (command.text, os.environ.get("TORCH_PY"), os.environ.get("OFFICIAL_BENCH"))
            absolute = [w for w in argv[1:] if re.search(r"(^|=)/", w) and not any(w in g for g in given if g)]
            assert not absolute, f"{absolute}: paths in README commands must stay relative here (that is the point)"
            t, cpu = time.perf_counter(), _children_cpu()
            out = subprocess.run(argv, cwd=cwd, env={**_env(), **env}, capture_output=True, text=True, timeout=600)
            seconds, cpu = time.perf_counter() - t, _children_cpu() - cpu
            ok = out.returncode == 0 and run.expect in out.stdout
            report.append(f"{'ok  ' if ok else 'FAIL'} {seconds:5.1f}s (cpu {cpu:5.1f}s)  {text}")
            if not ok:
                why = (f"exit status {out.returncode}" if out.returncode else f"{run.expect!r} not in its output")
                tail = "\n".join((out.stderr.strip() or out.stdout.strip()).splitlines()[-12:])
                failures.append(f"{command}\n  ran (cwd {cwd}): {text}\n  {why}:\n{tail}")
    print(f"\n[{test}] README commands run from {cwd}:\n" + "\n".join(report))
    assert not failures, f"{len(failures)} README command(s) failed:\n\n" + "\n\n".join(failures)


@pytest.fixture
def cwd(tmp_path):
    """A working directory outside the repo with the placeholders' inputs in place."""
    work = tmp_path / "work"
    hub = work / PLACEHOLDERS["path/to/huginn-0125"]
    hub.mkdir(parents=True)
    for f in [*(FIXTURES / "tiny_fp32").iterdir(), *(FIXTURES / "hf_tokenizer").iterdir()]:
        if f.suffix != ".npz":  # the parity data is not part of a hub checkpoint
            shutil.copy(f, hub / f.name)
    return work


# -- tests -----------------------------------------------------------------------------------------------


def test_readme_parser_on_a_sample():
    sample = ("## A\n\n```bash\npython -m x a b \\\n    [--y 1] [k.v=2] --z 'q # r'   # note\n# comment\n```\n\n"
              "```\nrecurrence loss\nXLA_FLAGS=1 python t.py c=[1,2]\n```\n\n```python\nimport x\n```\n")
    (a, b) = readme_commands(sample)
    assert (a.text, a.line, a.section) == ("python -m x a b [--y 1] [k.v=2] --z 'q # r'", 4, "A")
    assert a.optional == ("--y 1", "k.v=2") and a.base == "python -m x a b --z 'q # r'"
    assert b.text == "XLA_FLAGS=1 python t.py c=[1,2]" and b.optional == () and b.line == 11


def coverage_problems(commands: list[Command]) -> list[str]:
    """Each README command must match exactly one RUN or SKIP entry, with its optional parts in a variant;
    each entry must match a command."""
    problems = []
    for c in commands:
        run, skip = _entries(c, RUN), _entries(c, SKIP)
        if len(run) + len(skip) != 1:
            problems.append(f"{c}\n  matches RUN {run} and SKIP {skip}: it needs exactly one entry in "
                            "tests/test_readme.py (RUN: how it runs on CPU, or SKIP: why not)")
        elif run:
            covered = {part for variant in RUN[run[0]].variants for part in variant}
            if missing := [part for part in c.optional if part not in covered]:
                problems.append(f"{c}\n  optional part(s) {missing} are in no variant of its RUN entry")
    problems += [f"RUN[{pattern!r}].test={run.test!r} is none of the tests that run commands: {sorted(TESTS)}"
                 for pattern, run in RUN.items() if run.test not in TESTS]
    for table in (RUN, SKIP):
        for pattern in table:
            if not any(re.match(pattern, c.text) for c in commands):
                problems.append(f"{pattern!r} matches no README command: remove it from tests/test_readme.py")
    return problems


def test_every_readme_command_is_run_or_skipped():
    commands = readme_commands()
    assert len(commands) >= 20, [str(c) for c in commands]
    problems = coverage_problems(commands)
    assert not problems, "\n\n".join(problems)


def test_a_new_readme_command_needs_an_entry():
    commands = readme_commands()
    new = readme_commands("## New\n\n```bash\npython -m rdlm.something ckpt/x [--fast]\n```\n")
    assert [p.split("\n")[1] for p in coverage_problems(commands + new)] == [
        "  matches RUN [] and SKIP []: it needs exactly one entry in tests/test_readme.py (RUN: how it runs on CPU, "
        "or SKIP: why not)"]
    more = readme_commands("```bash\npython -m rdlm.inference --checkpoint ckpt/huginn-0125 [--new-flag]\n```\n")
    assert "['--new-flag'] are in no variant" in coverage_problems(commands + more)[0]
    assert "matches no README command" in coverage_problems([c for c in commands if "tpu.py" not in c.text])[0]


@pytest.mark.slow
def test_readme_checkpoint_commands(cwd):
    """Using huginn-0125 and Inference: convert the hub directory, export it back, generate from it."""
    _run_commands("checkpoint", cwd)
    assert (cwd / "ckpt/huginn-0125").is_dir() and (cwd / PLACEHOLDERS["path/to/hf-out"]).is_dir()


@pytest.mark.slow
def test_readme_training_commands(cwd):
    """Training: tokenizer, `demo` training, recurrence sweep; then the decode benchmark on that run."""
    _run_commands("training", cwd)
    assert (cwd / "runs/demo/recurrence_sweep.png").is_file()


@pytest.mark.slow
def test_readme_tpu_commands(cwd):
    """Running on Cloud TPU: every tpu.py command, with --dry-run."""
    _run_commands("tpu", cwd)


@pytest.mark.slow
def test_readme_experiment_commands(cwd):
    """Experiments: the sweep's dry run; the reasoning task's data, training and evaluation."""
    _run_commands("experiments", cwd)
    assert (cwd / "experiments/results/arithmetic/accuracy.png").is_file()


@pytest.mark.slow
def test_readme_benchmark_commands(cwd):
    """Configs and Benchmarks: the tools/bench.py command lines."""
    _run_commands("bench", cwd)


# The README's Python blocks, by their first line: run as a script from another folder, or skipped with the reason.
PYTHON_SKIP = {
    "import jax, rdlm": "needs huginn-0125's weights and an `input_ids`; the same calls run in test_convert and "
                        "test_model on the tiny fixture",
    "out = rdlm.forward(params, ids, cfg, num_steps=32, return_step_latents=True, decode_steps=True,":
        "a fragment (params, ids, cfg as above); tests/test_step_latents.py runs the same call",
    "out = rdlm.generate(params, [ids_a, ids_b], cfg, max_new_tokens=64, num_steps=32,":
        "a fragment (params, ids, tok from the blocks above); the same call runs in test_generate",
}


def python_blocks(text: str | None = None) -> list[str]:
    return [m[2] for m in FENCE.finditer(README.read_text() if text is None else text) if m[1] == "python"]


@pytest.mark.slow
def test_readme_python_blocks(tmp_path):
    blocks = python_blocks()
    firsts = [b.splitlines()[0] for b in blocks]
    assert set(PYTHON_SKIP) <= set(firsts), f"PYTHON_SKIP names blocks the README lacks: {set(PYTHON_SKIP) - set(firsts)}"
    ran = 0
    for block in blocks:
        if block.splitlines()[0] in PYTHON_SKIP:
            continue
        out = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             env=_env())
        assert out.returncode == 0, f"README block failed:\n{block}\n{out.stderr[-3000:]}"
        ran += 1
    assert ran >= 1
