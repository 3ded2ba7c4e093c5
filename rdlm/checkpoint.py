"""rdlm model checkpoints: a directory with `config.yml` (the resolved config) and `params/` (Orbax).

The converter writes this layout from the official HF format; everything else in rdlm loads it.
"""

from __future__ import annotations

import os
import shutil
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

from rdlm.errors import RdlmError
from rdlm.config import Config, ConfigError, load_config
from rdlm.params import abstract_params

CONFIG_FILE = "config.yml"
PARAMS_DIR = "params"


class CheckpointError(RdlmError, ValueError):
    """A checkpoint file or directory is missing, incomplete or inconsistent; the message names it."""


def load_model(path: str | os.PathLike, dtype: Any = None,
               sharding: jax.sharding.Sharding | None = None) -> tuple[Config, dict[str, Any]]:
    """Read an rdlm model checkpoint; `dtype` casts on load (default: as stored)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} is not an rdlm model checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/); "
                              "convert an HF checkpoint with `python -m rdlm.convert SRC DST`")
    try:
        cfg = load_config(path / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e
    stored = ocp_v1.metadata(path / PARAMS_DIR).metadata
    expected = abstract_params(cfg.model)
    want, treedef = jax.tree_util.tree_flatten_with_path(expected)
    have = jax.tree.leaves(stored)
    if jax.tree.structure(stored) != treedef:
        raise CheckpointError(f"{path / PARAMS_DIR}: parameter tree does not match the model in {path / CONFIG_FILE}")
    wrong = [f"{jax.tree_util.keystr(k)}: expected {list(w.shape)}, found {list(h.shape)}"
             for (k, w), h in zip(want, have) if tuple(w.shape) != tuple(h.shape)]
    if wrong:
        raise CheckpointError(f"{path / PARAMS_DIR}: mis-shaped parameters: " + "; ".join(wrong))
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(w.shape, jnp.dtype(dtype or h.dtype), sharding=sharding)
                                            for (_, w), h in zip(want, have)])
    params = ocp_v1.load(path / PARAMS_DIR, abstract)
    return cfg, params


@contextmanager
def staging_dir(dst: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of `dst` that replaces it only if the body succeeds."""
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

    def __init__(self, directory: str | os.PathLike, keep: int, async_save: bool):
        self.directory = epath.Path(directory)  # local or gs://
        if not str(directory).startswith("gs://"):
            self.directory = self.directory.absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

    def save(self, step: int, state: Any, data_iterator: Any, config: dict[str, Any]) -> None:
        """Every process calls this (each writes its shards and its own data-iterator state)."""
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_latest(self, template: Any, data_iterator: Any = None) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, with the shapes, dtypes and shardings of
        `template`; the data iterator, when given, is restored in place."""
        items = {"state": ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, template))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # a damaged step directory: set it aside (kept for inspection), use the one before
                aside = self.directory / f"{step}.unreadable"
                if jax.process_index() == 0:
                    (self.directory / str(step)).rename(aside)
                multihost_utils.sync_global_devices(f"rdlm-set-aside-{step}")
                print(f"warning: checkpoint {self.directory / str(step)} failed to restore "
                      f"({type(e).__name__}: {str(e)[:300]}); moved to {aside.name}, trying the previous one",
                      flush=True)
                continue
            self.manager.reload()
            return step, restored.state
        if steps:
            raise CheckpointError(f"no checkpoint in {self.directory} restores (tried steps {steps}, now set aside "
                                  "as STEP.unreadable); refusing to start over silently")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
