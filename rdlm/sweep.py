"""Sweeps: one training run per point of a grid of config overrides, each evaluated at several test-time
recurrences, collected in one results table with plots.

    python -m rdlm.sweep SWEEP.yml [--dry-run] [--print-commands] [--launch tpu --name NAME --zone ZONE]

The sweep file:

    base: demo                        # a configs/ preset name, or a config YAML path
    out: ../runs/recurrence_depth     # the sweep folder: one run folder per point, results.{md,csv}, plots
    overrides:                        # fixed for every point: a mapping, or a list of key=value
      train.steps: 600
    product:                          # the Cartesian product of these lists ...
      model.mean_recurrence: [4, 8, 16]
    zip:                              # ... times these equal-length lists, taken together
      optim.lr: [1.0e-3, 2.0e-3]
      optim.warmup_steps: [50, 100]
    recurrence: [1, 4, 8, 16, 32, 64] # test-time recurrences evaluated after training (this default)
    eval_batches: 16                  # validation batches of that evaluation (this default)

Relative paths in the sweep file (`base`, `out`, `data.tokenizer`, `data.paths`) are relative to the sweep
file's folder, so the command gives the same result from any folder; relative paths inside the base
preset keep their meaning for `rdlm.train` (the working directory). Every point is validated as
`rdlm.train` validates a config, before anything runs; an error names the key and the point.

A point's run folder is `SLUG-HASH` under `out`: the slug reads the varied values, the hash is of the
resolved config without the settings that do not change what is learned (`NOT_HASHED`). Points run one
after another in this process (`rdlm.train.train`): a point whose newest checkpoint is at `train.steps` is
skipped, any other resumes from its newest checkpoint. Then every finished run is evaluated on the same
held-out batches at each `recurrence` (one compile for all depths; cached in the run's `eval.json`) and
`results.md`, `results.csv`, `val_loss_vs_recurrence.png` and `val_loss_vs_flops.png` are written. Each
point prints one line per phase; on a terminal a progress bar over the points is drawn (rdlm.progress).

`--dry-run` lists the points and their state and runs nothing; `--print-commands` prints one
`python -m rdlm.train` command per point. `--launch tpu` runs the points one after another on a Cloud TPU
VM through `tools/tpu/tpu.py run` (the VM's copy of this checkout; with `--dry-run`, the gcloud commands
are printed instead, with `--print-commands` the tpu.py commands); copy the run folders back into `out`
and run the sweep here to evaluate them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rdlm.checkpoint import RESUME_FREE, load_run
from rdlm.config import (Config, ConfigError, _field_type, _unknown, load_config, parse_overrides,
                         parse_yaml, resolve_preset, to_dict)
from rdlm.errors import ArgumentParser, RdlmError, cli
from rdlm.evaluate import DEFAULT_RECURRENCE, heldout_batches
from rdlm.flops import train_flops_per_token
from rdlm.progress import track
from rdlm.tokenizer import load_tokenizer
from rdlm.train import _resolved, _sample, evaluate, train

REPO = Path(__file__).resolve().parent.parent  # the checkout (tools/tpu/tpu.py, the TPU VM's copy of it)
DEFAULT_EVAL_BATCHES = 16  # as experiments/recurrence_sweep.py
SWEEP_KEYS = ("base", "out", "overrides", "product", "zip", "recurrence", "eval_batches")
PATH_KEYS = ("data.tokenizer", "data.paths")  # anchored at the sweep file's folder
PER_POINT = ("train.out_dir", "train.checkpoint_dir")  # set by the sweep, one folder per point
# Left out of the hash: where a run writes, what it logs and evaluates, and compute choices that give the
# same training (the attention implementation, rematerialisation, loss tiling, the device mesh).
NOT_HASHED = {*PER_POINT, *RESUME_FREE, "train.log_every", "train.eval_every", "train.eval_batches",
              "train.eval_recurrence", "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint",
              "train.restart_from_scratch", "train.tensorboard", "train.remat", "train.loss_chunk", "mesh"}


class SweepError(RdlmError):
    """A point failed to train or launch; the message names it."""


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file; paths absolute."""

    file: Path
    base: str  # a preset name, or an absolute YAML path
    out: Path
    overrides: dict[str, Any]
    product: dict[str, list]
    zip: dict[str, list]
    recurrence: tuple[int, ...]
    eval_batches: int


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its overrides (fixed and varied), the validated config, and its run folder."""

    index: int
    total: int
    overrides: dict[str, Any]
    varied: dict[str, Any]
    config: Config  # train.out_dir is the run folder
    digest: str

    @property
    def name(self) -> str:
        return Path(self.config.train.out_dir).name

    @property
    def label(self) -> str:
        return _label(self.index, self.total, self.varied)


def _label(index: int, total: int, varied: dict[str, Any]) -> str:
    """How errors name a point: `point 3/6 (model.mean_recurrence=8, model.mean_backprop_depth=1)`."""
    values = ", ".join(f"{k}={v}" for k, v in varied.items())
    return f"point {index + 1}/{total}" + (f" ({values})" if values else "")


# ---- the sweep file and its grid ------------------------------------------------------------------


def _anchor(key: str, value: Any, folder: Path) -> Any:
    """Relative local paths of the PATH_KEYS, made absolute from `folder`."""
    def one(p: Any) -> Any:
        if not isinstance(p, str) or not p or "://" in p:
            return p
        return os.path.normpath(folder / os.path.expanduser(p))
    if key not in PATH_KEYS:
        return value
    return [one(p) for p in value] if isinstance(value, (list, tuple)) else one(value)


def _mapping(data: Any, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of dotted keys (model.mean_recurrence: ...), got "
                          f"{type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def _lists(data: Any, where: str) -> dict[str, list]:
    out = _mapping(data, where)
    for key, values in out.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{key} must be a non-empty list of values, got {values!r}")
    return out


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Parse and check a sweep file (its points are checked by `expand`)."""
    file = Path(path).absolute()
    try:
        data = parse_yaml(file.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"sweep file {path} cannot be read: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with base:, out: and product: / zip:")
    for key in data:
        if key not in SWEEP_KEYS:
            raise _unknown(str(key), list(SWEEP_KEYS), str(path))
    for key, what in (("base", "a preset name or config path"), ("out", "the sweep folder")):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ConfigError(f"{path}: {key}: is required ({what})")
    folder = file.parent
    base = data["base"]
    if base.endswith((".yml", ".yaml")) or "/" in base:  # a path, relative to the sweep file
        base = str(resolve_preset(folder / os.path.expanduser(base)).absolute())
    else:
        resolve_preset(base)  # an unknown preset name fails here, listing the presets
    fixed = data.get("overrides")
    if isinstance(fixed, list):
        if not all(isinstance(item, str) for item in fixed):
            raise ConfigError(f"{path}: overrides: a list must hold key=value strings")
        fixed = dict(parse_overrides(fixed))
    fixed, product, zipped = (_mapping(fixed, f"{path}: overrides"), _lists(data.get("product"), f"{path}: product"),
                              _lists(data.get("zip"), f"{path}: zip"))
    seen: dict[str, str] = {}
    for section, keys in (("overrides", fixed), ("product", product), ("zip", zipped)):
        for key in keys:
            if key in PER_POINT:
                raise ConfigError(f"{path}: {section}.{key}: the sweep gives every point its own run folder under "
                                  "out:; set out: instead")
            if key in seen:
                raise ConfigError(f"{path}: {key} is set in both {seen[key]} and {section}")
            seen[key] = section
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"{path}: zip lists must have equal lengths: "
                          + ", ".join(f"{k} has {n}" for k, n in lengths.items()))
    recurrence = data.get("recurrence", list(DEFAULT_RECURRENCE))
    if (not isinstance(recurrence, list) or not recurrence
            or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in recurrence)):
        raise ConfigError(f"{path}: recurrence: expected a list of integers >= 1, got {recurrence!r}")
    batches = data.get("eval_batches", DEFAULT_EVAL_BATCHES)
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise ConfigError(f"{path}: eval_batches: expected an integer >= 1, got {batches!r}")
    anchor = lambda d: {k: _anchor(k, v, folder) for k, v in d.items()}  # noqa: E731
    return Sweep(file=file, base=base, out=Path(os.path.normpath(folder / os.path.expanduser(data["out"]))),
                 overrides=anchor(fixed), product={k: [_anchor(k, v, folder) for v in vs] for k, vs in product.items()},
                 zip={k: [_anchor(k, v, folder) for v in vs] for k, vs in zipped.items()},
                 recurrence=tuple(recurrence), eval_batches=batches)


def grid(product: dict[str, list], zipped: dict[str, list]) -> list[dict[str, Any]]:
    """The varied values of every point: each combination of `product` times each position of `zipped`
    (equal lengths), product keys first; one empty point when both are empty."""
    combos = [dict(zip(product, values)) for values in itertools.product(*product.values())]
    rows = [dict(zip(zipped, values)) for values in zip(*zipped.values())] if zipped else [{}]
    return [{**c, **z} for c in combos for z in rows]


def override_text(key: str, value: Any) -> str:
    """`key=value` as `rdlm.train` parses it back to `value`: JSON (a subset of YAML) except for keys
    declared as strings, which take the text as written."""
    return f"{key}={value}" if _field_type(key) is str else f"{key}={json.dumps(value, separators=(',', ': '))}"


def digest(config: Config, folder: Path) -> str:
    """8 hex digits of the resolved config without NOT_HASHED, local PATH_KEYS written relative to `folder`
    (the sweep file's): stable across override order, working directory and a moved checkout."""
    tree = to_dict(config)
    for key in NOT_HASHED:
        section, _, leaf = key.partition(".")
        if leaf:
            tree[section].pop(leaf, None)
        else:
            tree.pop(section, None)
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        rel = lambda p: p if not p or "://" in p else os.path.relpath(p, folder)  # noqa: E731
        value = tree[section][leaf]
        tree[section][leaf] = [rel(p) for p in value] if isinstance(value, list) else rel(value)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:8]


def slug(varied: dict[str, Any], fallback: str) -> str:
    """A readable folder name from the varied values (`mean_recurrence4_mean_backprop_depth1`)."""
    text = "_".join(f"{k.rsplit('.', 1)[-1]}{v if not isinstance(v, list) else '-'.join(map(str, v))}"
                    for k, v in varied.items())
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text or fallback).strip("_")[:80]


def _run_dir(out: Path, name: str, digest_: str) -> Path:
    """`out/name`, or an existing folder of the same hash under another slug (the varied keys changed)."""
    if (out / name).exists():
        return out / name
    return next(iter(sorted(out.glob(f"*-{digest_}"))), out / name)


def expand(sweep: Sweep) -> list[Point]:
    """Every point validated (config keys, values, cross-section constraints), with its run folder; two
    points that train the same model are refused."""
    values = grid(sweep.product, sweep.zip)
    fallback = Path(sweep.base).stem
    points, seen = [], {}
    for i, varied in enumerate(values):
        overrides = {**sweep.overrides, **varied}
        label = _label(i, len(values), varied)
        try:
            config = _resolved(load_config(sweep.base, [override_text(k, v) for k, v in overrides.items()]))
            config.check_trainable()
        except ConfigError as e:
            raise ConfigError(f"{sweep.file}: {label}: {e}", hint=e.hint) from e
        if config.train.checkpoint_dir:
            raise ConfigError(f"{sweep.file}: {label}: train.checkpoint_dir={config.train.checkpoint_dir} (from the "
                              "base config) would be shared by every point; a sweep keeps checkpoints in each run "
                              "folder")
        key = digest(config, sweep.file.parent)
        if key in seen:
            other = points[seen[key]]
            keys = ", ".join(k for k in overrides if other.overrides.get(k) != overrides[k])
            raise ConfigError(f"{sweep.file}: {label} trains the same model as {other.label}: {keys} do not change "
                              "what is learned (rdlm.sweep.NOT_HASHED)")
        seen[key] = i
        run_dir = _run_dir(sweep.out, f"{slug(varied, fallback)}-{key}", key)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=str(run_dir)))
        points.append(Point(i, len(values), overrides, varied, config, key))
    return points


# ---- training -------------------------------------------------------------------------------------


def completed_step(config: Config) -> int | None:
    """The newest complete checkpoint step of a run folder (Orbax's listing, as `TrainCheckpointer.steps`:
    unfinished saves are not listed), None without one."""
    directory = Path(config.train.out_dir) / "checkpoints"
    steps = ocp.utils.checkpoint_steps(directory) if directory.is_dir() else []
    return max(steps) if steps else None


def describe(done: int | None, steps: int) -> str:
    """A run's state from its newest checkpoint step: `new`, `finished` or `at step S/N`."""
    return "new" if done is None else "finished" if done == steps else f"at step {done}/{steps}"


def check_tokenizers(sweep: Sweep, points: list[Point]) -> None:
    """Every point's tokenizer opens, before any point trains; a missing sentencepiece model names the
    command that trains it."""
    for p in points:
        data, vocab = p.config.data, p.config.model.vocab_size
        try:
            load_tokenizer(None, fallback=data.tokenizer, model_vocab_size=vocab)
        except ConfigError as e:
            hint = e.hint
            if data.tokenizer.endswith(".model") and not Path(data.tokenizer).exists():
                data_args = [override_text(k, v) for k, v in p.overrides.items()
                             if k.startswith("data.") and k != "data.tokenizer"]
                hint = "train it first: " + shlex.join(
                    [sys.executable, str(REPO / "tools/train_tokenizer.py"), sweep.base, *data_args, "--vocab-size",
                     str(vocab), "--out", data.tokenizer.removesuffix(".model")])
            raise ConfigError(f"{sweep.file}: {p.label}: {e}", hint=hint) from e


def train_points(points: list[Point], should_stop: Callable[[int], bool] | None = None) -> dict[str, str]:
    """Train (or resume, or skip) each point in turn; point name -> status (`finished`, `at step S/N`,
    `failed: ...`). In this process: one jax runtime for all points; each point's train step is its own
    jit (freed with it), only the small per-model eval and sampler programs stay cached."""
    status = {}
    for p in track(points, "training"):
        steps, head = p.config.train.steps, f"[{p.index + 1}/{p.total}] {p.name}"
        done = completed_step(p.config)
        if done == steps:
            print(f"{head}: skipped, finished at step {steps}", flush=True)
        else:
            print(f"{head}: {'training' if done is None else f'resuming from step {done}'} to step {steps}",
                  flush=True)
            start = time.time()
            try:
                done = train(p.config, should_stop)["step"]
            except RdlmError as e:
                status[p.name] = f"failed: {e}"
                print(f"{head}: failed: {e}", flush=True)
                continue
            print(f"{head}: {'finished' if done == steps else 'stopped'} at step {done} "
                  f"in {time.time() - start:.0f} s", flush=True)
        status[p.name] = describe(done, steps)
    return status


# ---- evaluation and results -----------------------------------------------------------------------


def sampled_depths(config: Config) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) of every training step, replayed: `rdlm.train` draws them from (train.seed, step) alone."""
    tc = config.train
    rng = jax.random.key_data(jax.random.key(tc.seed))
    n, k = jax.vmap(lambda s: _sample(rng, s, config.model, tc.recurrence))(jnp.arange(tc.steps, dtype=jnp.int32))
    return np.asarray(n), np.asarray(k)


def cumulative_flops(config: Config) -> np.ndarray:
    """Model FLOPs (rdlm.flops) of the training run up to and including each step."""
    tc = config.train
    per_step = [train_flops_per_token(config.model, int(n), int(k), tc.seq_len) * tc.batch_size * tc.seq_len
                for n, k in zip(*sampled_depths(config))]
    return np.cumsum(per_step)


def evaluate_point(p: Point, recurrence: tuple[int, ...], batches: int) -> dict[int, float]:
    """Validation loss at each test-time recurrence of a finished run, as experiments/recurrence_sweep.py
    computes it; cached in the run folder's eval.json (reused while the step and batch count agree)."""
    cache = Path(p.config.train.out_dir) / "eval.json"
    steps = p.config.train.steps
    try:
        saved = json.loads(cache.read_text())
        same = saved["step"] == steps and saved["batches"] == batches
        known = {int(r): v for r, v in saved["loss"].items()} if same else {}
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    todo = tuple(r for r in recurrence if r not in known)
    if todo:
        _, params, step = load_run(p.config.train.out_dir)
        if step != steps:
            raise SweepError(f"{p.name}: the newest readable checkpoint is at step {step}, not {steps}")
        cfg = p.config.model
        tokenizer = load_tokenizer(None, fallback=p.config.data.tokenizer, model_vocab_size=cfg.vocab_size)
        known |= evaluate(params, heldout_batches(p.config, tokenizer, batches), todo, cfg)
        cache.write_text(json.dumps({"step": steps, "batches": batches, "loss": known}) + "\n")
    return {r: known[r] for r in recurrence}


def _metrics(run_dir: Path) -> tuple[float | None, dict[int, dict[int, float]]]:
    """(last logged training loss, {step: {recurrence: validation loss}}) from metrics.jsonl; a step logged
    twice (steps redone after an interruption) keeps its last row."""
    loss, evals = None, {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None, {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a killed run or a full disk: the others still count
            continue
        if "event" in row:
            continue
        if row.get("loss") is not None:
            loss = row["loss"]
        if "eval" in row:
            evals[row["step"]] = {int(r): v for r, v in row["eval"].items() if v is not None}
    return loss, evals


def collect(sweep: Sweep, points: list[Point], status: dict[str, str]) -> list[dict[str, Any]]:
    """One row per point: run folder, varied values, status, last training loss, validation loss per
    test-time recurrence (`val_loss_rR`, finished runs), training tokens and FLOPs, and `curve`: the eval
    rows of metrics.jsonl against training FLOPs."""
    rows = []
    for p in track(points, "evaluating"):
        tc = p.config.train
        loss, evals = _metrics(Path(tc.out_dir))
        flops = cumulative_flops(p.config)
        row = {"run": p.name, **p.varied, "status": status[p.name], "train_loss": loss,
               "train_tokens": tc.steps * tc.batch_size * tc.seq_len, "train_flops": float(flops[-1]),
               "curve": _curve(evals, flops, p.config.model.mean_recurrence)}
        if row["status"] == "finished":
            try:
                val = evaluate_point(p, sweep.recurrence, sweep.eval_batches)
            except RdlmError as e:
                row["status"] = f"failed: {e}"
            else:
                row |= {f"val_loss_r{r}": v for r, v in val.items()}
                print(f"[{p.index + 1}/{p.total}] {p.name}: validation loss "
                      + "  ".join(f"r={r}: {v:.4f}" for r, v in val.items()), flush=True)
        rows.append(row)
    return rows


def _curve(evals: dict[int, dict[int, float]], flops: np.ndarray, mean: int) -> tuple[int, list[tuple[float, float]]]:
    """(r, [(training FLOPs, validation loss at r)]) of the eval rows logged during training, at the
    recurrence of every row nearest the training mean; (0, []) without eval rows."""
    evals = {s: v for s, v in evals.items() if 0 < s <= len(flops)}
    common = sorted(set.intersection(*(set(v) for v in evals.values()))) if evals else []
    if not common:
        return 0, []
    r = min(common, key=lambda x: abs(math.log2(max(x, 1) / mean)))
    return r, [(float(flops[s - 1]), v[r]) for s, v in sorted(evals.items())]


def _columns(sweep: Sweep) -> list[tuple[str, str]]:
    """(csv name, markdown header) of every results column."""
    varied = [(k, k) for k in [*sweep.product, *sweep.zip]]
    val = [(f"val_loss_r{r}", f"val r={r}") for r in sweep.recurrence]
    return [("run", "run"), *varied, ("status", "status"), ("train_loss", "train loss"), *val,
            ("train_tokens", "tokens"), ("train_flops", "train FLOPs")]


def _markdown(value: Any, name: str) -> str:
    """A table cell: losses to 4 decimals, FLOPs in e-notation, tokens with thousands separators."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3e}" if name == "train_flops" else f"{value:.4f}"
    if name == "train_tokens":
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_results(sweep: Sweep, rows: list[dict[str, Any]]) -> list[Path]:
    """results.csv, results.md and the plots in the sweep folder; the paths written."""
    columns = _columns(sweep)
    csv_path, md_path = sweep.out / "results.csv", sweep.out / "results.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([name for name, _ in columns])
        writer.writerows([["" if row.get(name) is None else row[name] for name, _ in columns] for row in rows])
    plots = plot(sweep, rows)
    fixed = ", ".join(f"`{override_text(k, v)}`" for k, v in sweep.overrides.items()) or "none"
    lines = [f"# Sweep {sweep.file.name}", "",
             f"Base `{sweep.base}`, fixed overrides: {fixed}. Validation loss in nats per token on "
             f"{sweep.eval_batches} held-out batches at test-time recurrence r; training FLOPs are model FLOPs "
             "(rdlm.flops) of the sampled depths.", "",
             "| " + " | ".join(header for _, header in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|",
             *("| " + " | ".join(_markdown(row.get(name), name) for name, _ in columns) + " |" for row in rows), "",
             *(f"![{title}]({path.name})" for title, path in plots)]
    md_path.write_text("\n".join(lines) + "\n")
    return [md_path, csv_path, *(path for _, path in plots)]


def plot(sweep: Sweep, rows: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    """(title, PNG) of validation loss against test-time recurrence (one line per evaluated point) and
    against training FLOPs (metrics.jsonl's eval rows, at the recurrence nearest each point's training mean);
    a plot without any line is not written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure(name: str, title: str, xlabel: str, base: int, lines: list[tuple[str, list, list]]) -> list:
        if not lines:
            return []
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=base)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{sweep.file.stem}: {title}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(sweep.out / name)
        plt.close(fig)
        return [(f"validation loss against {title}", sweep.out / name)]

    recurrence = [(row["run"], list(sweep.recurrence), [row[f"val_loss_r{r}"] for r in sweep.recurrence])
                  for row in rows if f"val_loss_r{sweep.recurrence[0]}" in row]
    flops = [(f"{row['run']} (r={row['curve'][0]})", *map(list, zip(*row["curve"][1]))) for row in rows
             if row["curve"][1]]
    return (figure("val_loss_vs_recurrence.png", "test-time recurrence", "test-time recurrence (core iterations)", 2,
                   recurrence)
            + figure("val_loss_vs_flops.png", "training FLOPs", "training FLOPs (model FLOPs)", 10, flops))


# ---- commands and the CLI -------------------------------------------------------------------------


def _in_checkout(path: str, what: str, p: Point) -> str:
    """A local path as the TPU VM's copy of the checkout sees it: relative to the checkout root."""
    if "://" in path:
        return path
    rel = os.path.relpath(path, REPO)
    if rel == ".." or rel.startswith(".." + os.sep):
        raise ConfigError(f"{p.label}: {what}={path} is outside the checkout {REPO}; a TPU VM holds only a copy of "
                          "the checkout (tools/tpu/tpu.py install)", hint="put it inside the checkout, or use gs://")
    return rel


def train_args(sweep: Sweep, p: Point, remote: bool = False) -> list[str]:
    """A point's `rdlm.train` arguments: CONFIG, its overrides, train.out_dir. `remote`: paths relative to
    the checkout, as on a TPU VM (whose working directory is its copy of the checkout)."""
    base, out, overrides = sweep.base, p.config.train.out_dir, dict(p.overrides)
    if remote:
        base = _in_checkout(base, "base", p) if os.path.isabs(base) else base
        out = _in_checkout(out, "out", p)
        for key in PATH_KEYS:
            if isinstance(value := overrides.get(key), str):
                overrides[key] = _in_checkout(value, key, p)
            elif value is not None:
                overrides[key] = [_in_checkout(v, key, p) for v in value]
    return [base, *(override_text(k, v) for k, v in overrides.items()), override_text("train.out_dir", out)]


def _tpu_tool():
    """tools/tpu/tpu.py of this checkout, as a module."""
    path = REPO / "tools" / "tpu" / "tpu.py"
    if not path.is_file():
        raise SweepError(f"--launch tpu needs {path}: run the sweep from a source checkout")
    spec = importlib.util.spec_from_file_location("rdlm_tpu_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch_tpu(sweep: Sweep, points: list[Point], name: str, zone: str, dry_run: bool, print_only: bool) -> None:
    """Each point through `tools/tpu/tpu.py run`, one after another (each returns when its run ends);
    `dry_run`: tpu.py prints the gcloud commands; `print_only`: print the tpu.py commands."""
    tool = _tpu_tool()
    for p in points:
        argv = ["run", "--name", name, "--zone", zone, *train_args(sweep, p, remote=True)]
        if print_only:
            print(shlex.join([sys.executable, str(REPO / "tools/tpu/tpu.py"), *argv]))
            continue
        if not dry_run:
            print(f"[{p.index + 1}/{p.total}] {p.name}: training on the TPU VM {name}", flush=True)
        code = tool.main([*argv, "--dry-run"] if dry_run else argv)
        if code:
            raise SweepError(f"{p.label}: tools/tpu/tpu.py run failed with exit code {code}"
                             + (f"; points 1 to {p.index} ran before it" if p.index else ""),
                             hint="rerun the sweep: runs finished there only print 'nothing to do'")
    if not dry_run and not print_only:
        print(f"the runs are in ~/{tool.REMOTE_DIR}/{os.path.relpath(sweep.out, REPO)} on {name}: copy them into "
              f"{sweep.out} (tools/tpu/tpu.py copy-to-gcs, copy-from-gcs) and run `python -m rdlm.sweep "
              f"{sweep.file}` to evaluate them")


def list_points(points: list[Point]) -> None:
    """One line per point: run folder, state, overrides."""
    for p in points:
        state = describe(completed_step(p.config), p.config.train.steps)
        print(f"[{p.index + 1}/{p.total}] {p.config.train.out_dir}  {state}  "
              + " ".join(override_text(k, v) for k, v in p.overrides.items()))


def run(sweep: Sweep, should_stop: Callable[[int], bool] | None = None) -> list[dict[str, Any]]:
    """Train every point (skipping finished ones), evaluate the finished ones, write the results; the
    results rows. Raises SweepError after writing them when a point failed."""
    points = expand(sweep)
    check_tokenizers(sweep, points)
    sweep.out.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep, points, train_points(points, should_stop))
    written = write_results(sweep, rows)
    print("wrote " + ", ".join(str(path) for path in written), flush=True)
    failed = [row["run"] for row in rows if row["status"].startswith("failed")]
    if failed:
        raise SweepError(f"{len(failed)} of {len(rows)} points failed: {', '.join(failed)} (see above)",
                         hint="fix the cause and rerun the sweep: finished points are skipped")
    return rows


@cli
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m rdlm.sweep", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the sweep file (YAML)")
    parser.add_argument("--launch", choices=["tpu"], help="run the points on a Cloud TPU VM (tools/tpu/tpu.py run)")
    parser.add_argument("--name", help="the TPU VM (with --launch tpu)")
    parser.add_argument("--zone", help="its zone (with --launch tpu)")
    parser.add_argument("--print-commands", action="store_true", help="print one command per point, run nothing")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the points (with --launch tpu: print the gcloud commands), run nothing")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.launch and not (args.name and args.zone):
        parser.error("--launch tpu needs --name and --zone (the TPU VM, as tools/tpu/tpu.py create made it)")
    if not args.launch and (args.name or args.zone):
        parser.error("--name and --zone go with --launch tpu")
    sweep = load_sweep(args.sweep)
    if args.launch:
        launch_tpu(sweep, expand(sweep), args.name, args.zone, args.dry_run, args.print_commands)
    elif args.print_commands:
        for p in expand(sweep):
            print(shlex.join([sys.executable, "-m", "rdlm.train", *train_args(sweep, p)]))
    elif args.dry_run:
        list_points(expand(sweep))
    else:
        run(sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
