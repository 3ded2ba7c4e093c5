"""Checkpoints: rdlm model checkpoints, training checkpoints, and reading weights from either.

A model checkpoint is a directory with `config.yml` (the resolved config), `params/` (Orbax) and
`files.json` (the size of every file under `params/`, so that a truncated or missing file is named
before Orbax reads it). The converter writes this layout from the official HF format. A training run
folder holds `config.yml` and `checkpoints/STEP/` (train state, data-iterator state, config), written by
`TrainCheckpointer`; `load_run` reads its weights without building an optimizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import grain
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
import orbax.checkpoint.experimental.v1 as ocp_v1
from etils import epath

from rdlm.config import Config, ConfigError, config_from_dict, dump_config, load_config, to_dict
from rdlm.errors import RdlmError
from rdlm.params import abstract_params

CONFIG_FILE = "config.yml"
PARAMS_DIR = "params"
MANIFEST_FILE = "files.json"
RESUME_SECTIONS = ("model", "data", "optim")  # what a resumed run must keep; train.* and mesh.* may change
RESUME_FREE = {"model.attention", "data.prefetch"}  # compute choices inside those sections, free to change


class CheckpointError(RdlmError, ValueError):
    """A checkpoint file or directory is missing, incomplete or inconsistent; the message names it."""


def _single_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _saved_config(file: Path) -> Config:
    """The config a checkpoint or run folder was saved with; an invalid one raises CheckpointError naming it."""
    try:
        return load_config(file)
    except ConfigError as e:
        raise CheckpointError(str(e) if str(file) in str(e) else f"{file}: {e}") from e


def load_model(path: str | os.PathLike, dtype: Any = None,
               sharding: jax.sharding.Sharding | None = None) -> tuple[Config, dict[str, Any]]:
    """Read an rdlm model checkpoint; `dtype` casts on load (default: as stored). A damaged checkpoint
    (missing, truncated or corrupt file) raises CheckpointError naming the file."""
    path = Path(path).absolute()  # Orbax takes absolute paths only
    if not (path / CONFIG_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} is not an rdlm model checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/); "
                              "convert an HF checkpoint with `python -m rdlm.convert SRC DST`")
    cfg = _saved_config(path / CONFIG_FILE)
    verify_files(path)
    try:
        stored = ocp_v1.metadata(path / PARAMS_DIR).metadata
    except Exception as e:  # noqa: BLE001 (Orbax raises many types for damaged metadata)
        raise damaged(path, e) from e
    expected = abstract_params(cfg.model)
    want, treedef = jax.tree_util.tree_flatten_with_path(expected)
    have = jax.tree.leaves(stored)
    if jax.tree.structure(stored) != treedef:
        bad_json = _unparsable_json(path / PARAMS_DIR)
        if bad_json:
            raise damaged(path, f"{bad_json} is not valid JSON")
        raise CheckpointError(f"{path / PARAMS_DIR}: parameter tree does not match the model in {path / CONFIG_FILE} "
                              "(or the checkpoint is damaged)")
    wrong = [f"{jax.tree_util.keystr(k)}: expected {list(w.shape)}, found {list(h.shape)}"
             for (k, w), h in zip(want, have) if tuple(w.shape) != tuple(h.shape)]
    if wrong:
        raise CheckpointError(f"{path / PARAMS_DIR}: mis-shaped parameters: " + "; ".join(wrong))
    sharding = sharding or _single_device()
    abstract = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(w.shape, jnp.dtype(dtype or h.dtype), sharding=sharding)
                                            for (_, w), h in zip(want, have)])
    try:
        return cfg, ocp_v1.load(path / PARAMS_DIR, abstract)
    except Exception as e:  # noqa: BLE001 (TensorStore errors for damaged array files)
        raise damaged(path, e) from e


def save_model(path: str | os.PathLike, config: Config, params: dict[str, Any], overwrite: bool = False) -> None:
    """`params` as an rdlm model checkpoint at `path` (what `load_model` reads), written in a staging folder
    that replaces `path` only once complete."""
    with staging_dir(Path(path), overwrite) as tmp:
        ocp_v1.save(tmp / PARAMS_DIR, params)
        write_manifest(tmp)
        dump_config(config, tmp / CONFIG_FILE)


def write_manifest(root: Path) -> None:
    """`files.json` in `root`: the size of every file under `root/params`, for `verify_files`."""
    sizes = {str(f.relative_to(root)): f.stat().st_size for f in sorted((root / PARAMS_DIR).rglob("*")) if f.is_file()}
    (root / MANIFEST_FILE).write_text(json.dumps(sizes, indent=0))


def verify_files(root: Path) -> None:
    """Every file `files.json` lists is there with its size (checkpoints without the file are not checked)."""
    if not (root / MANIFEST_FILE).is_file():
        return
    try:
        sizes = json.loads((root / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{root / MANIFEST_FILE}: damaged ({e}); the checkpoint cannot be verified") from e
    for name, size in sizes.items():
        f = root / name
        if not f.is_file():
            raise CheckpointError(f"damaged checkpoint {root}: {f} is missing; convert again or restore it from a copy")
        if f.stat().st_size != size:
            raise CheckpointError(f"damaged checkpoint {root}: {f} has {f.stat().st_size} bytes, {size} were written "
                                  "(truncated or overwritten); convert again or restore it from a copy")


def _unparsable_json(directory: Path) -> Path | None:
    """The first Orbax metadata file (JSON) under `directory` that does not parse, if any."""
    for f in sorted(directory.rglob("*")):
        if f.is_file() and (f.name.endswith("METADATA") or f.suffix == ".json"):
            try:
                json.loads(f.read_bytes())
            except ValueError:
                return f
    return None


def damaged(root: Path, cause: Exception | str) -> CheckpointError:
    """CheckpointError naming the damaged file of an Orbax checkpoint: the file the storage layer reports,
    else a metadata file that does not parse, else the directory."""
    chain, e = [], cause
    while e is not None and len(chain) < 8:  # the storage layer's message may sit in a chained exception
        chain.append(str(e))
        e = e.__cause__ or e.__context__ if isinstance(e, BaseException) else None
    files = re.findall(r'local file \\?"([^"\\]+)\\?"', " ".join(chain))
    culprit = files[-1] if files else _unparsable_json(root)
    reason = str(cause).split("[tensorstore_spec", 1)[0].strip().splitlines()
    reason = reason[0][:300] if reason else type(cause).__name__
    return CheckpointError(f"damaged checkpoint {root}: {culprit or 'a file'} cannot be read ({reason}); "
                           "convert again or restore it from a copy")


def refuse_overlap(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Writing `dst` (and replacing it with --overwrite) must not touch the source `src`."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    if s == d or d in s.parents:
        raise CheckpointError(f"destination {dst} {'is' if s == d else 'contains'} the source {src}; replacing it "
                              "would delete the source: choose another destination")


@contextmanager
def staging_dir(dst: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of `dst` that replaces it only if the body succeeds."""
    dst = dst.absolute()  # Orbax takes absolute paths only
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- training checkpoints -------------------------------------------------------------------------


class TrainCheckpointer:
    """Orbax CheckpointManager over {train state, data-iterator state, config}: async saves, keep-N,
    atomic step directories; restore falls back to older steps when the newest one is unreadable."""

    def __init__(self, directory: str | os.PathLike, keep: int, async_save: bool, read_only: bool = False):
        self.directory = epath.Path(directory)  # local or gs://
        if not str(directory).startswith("gs://"):
            self.directory = self.directory.absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only, read_only=read_only))

    def save(self, step: int, state: Any, data_iterator: Any, config: dict[str, Any]) -> None:
        """Every process calls this (each writes its shards and its own data-iterator state)."""
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def steps(self) -> list[int]:
        """Complete steps, newest first (an interrupted save is never listed)."""
        return sorted(self.manager.all_steps(), reverse=True)

    def set_aside(self) -> list[str]:
        """Step directories an earlier restore found damaged and renamed `STEP.unreadable`."""
        return sorted(p.name for p in self.directory.glob("*.unreadable")) if self.directory.exists() else []

    def incomplete(self) -> list[str]:
        """Temporary directories of saves that never finished (a process killed while saving)."""
        return sorted(p.name for p in self.directory.glob("*.orbax-checkpoint-tmp*")) if self.directory.exists() else []

    def check_same_run(self, step: int, config: Config) -> None:
        """Refuse to resume `step` with other model, data or optimizer settings than it was saved with,
        naming the keys; a settings mismatch is not damage, so nothing is touched."""
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
            before = config_from_dict(saved, f"{self.directory / str(step)}/config")
        except Exception:  # noqa: BLE001 (an unreadable config is damage: the restore below sets the step aside)
            return
        old, new = (to_dict(dataclasses.replace(c, optim=c.optim.resolved())) for c in (before, config))
        changed = [f"{section}.{key} ({old[section][key]!r} in the checkpoint, {value!r} now)"
                   for section in RESUME_SECTIONS for key, value in new[section].items()
                   if old[section].get(key) != value and f"{section}.{key}" not in RESUME_FREE]
        if changed:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} was saved with different settings: {'; '.join(changed)}",
                hint="resume with the same settings, or choose a new train.out_dir (or train.checkpoint_dir)")

    def restore_latest(self, template: Any, data_iterator: Any = None, config: Config | None = None,
                       restart_from_scratch: bool = False) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, with the shapes, dtypes and shardings of
        `template`; the data iterator, when given, is restored in place. With `config`, a checkpoint saved
        with other settings is refused (`check_same_run`). None only for a fresh run, or when every
        checkpoint was found damaged and `restart_from_scratch` allows starting over."""
        items = {"state": ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, template))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        steps = self.steps()
        for step in steps:
            if config is not None:
                self.check_same_run(step, config)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 (a damaged step directory: set it aside, use the one before)
                aside = self.directory / f"{step}.unreadable"
                if jax.process_index() == 0:
                    (self.directory / str(step)).rename(aside)
                multihost_utils.sync_global_devices(f"rdlm-set-aside-{step}")
                print(f"warning: checkpoint {self.directory / str(step)} failed to restore "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); moved to {aside.name}, "
                      "trying the previous one", flush=True)
                continue
            self.manager.reload()
            return step, restored.state
        aside = self.set_aside()
        if aside and not restart_from_scratch:
            raise CheckpointError(f"no checkpoint in {self.directory} restores: {', '.join(aside)} were found damaged "
                                  "and set aside; refusing to start over silently",
                                  hint="inspect or delete them, or set train.restart_from_scratch=true to train "
                                       "from step 0")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def load_run(run_dir: str | os.PathLike, sharding: jax.sharding.Sharding | None = None
             ) -> tuple[Config, dict[str, Any], int]:
    """(config, params, step) of the newest readable checkpoint of a training run folder. Reads only the
    parameters (no optimizer is built) and never renames anything: reading is not repairing."""
    run_dir = Path(run_dir).absolute()
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{run_dir} is not a training run folder (no {CONFIG_FILE})")
    config = _saved_config(run_dir / CONFIG_FILE)
    directory = config.train.checkpoint_dir or run_dir / "checkpoints"
    if not str(directory).startswith("gs://") and not Path(directory).is_dir():
        raise CheckpointError(f"training run {run_dir} has no checkpoints yet ({directory} does not exist)")
    sharding = sharding or _single_device()
    template = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                       abstract_params(config.model, config.train.param_dtype))}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), template)
    checkpointer = TrainCheckpointer(directory, config.train.keep_checkpoints, async_save=False, read_only=True)
    try:
        for step in checkpointer.steps():
            try:
                restored = checkpointer.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=template, restore_args=restore_args, partial_restore=True)))
            except Exception as e:  # noqa: BLE001 (damaged: fall back to the step before)
                print(f"warning: {damaged(Path(str(checkpointer.directory / str(step))), e)}; trying the previous "
                      "step", file=sys.stderr, flush=True)
                continue
            return config, restored.state["params"], step
    finally:
        checkpointer.close()
    raise CheckpointError(f"no readable checkpoint in {directory}")
