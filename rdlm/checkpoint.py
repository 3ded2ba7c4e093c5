"""rdlm model checkpoints: a directory with `config.yml` (the resolved config) and `params/` (Orbax).

The converter writes this layout from the official HF format; everything else in rdlm loads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint.experimental.v1 as ocp

from rdlm.config import Config, ConfigError, load_config
from rdlm.params import abstract_params

CONFIG_FILE = "config.yml"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
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
    stored = ocp.metadata(path / PARAMS_DIR).metadata
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    expected = abstract_params(cfg.model)
    try:
        abstract = jax.tree.map(
            lambda want, have: jax.ShapeDtypeStruct(want.shape, jnp.dtype(dtype or have.dtype), sharding=sharding),
            expected, stored)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / PARAMS_DIR}: parameter tree does not match {path / CONFIG_FILE}: {e}") from e
    params = ocp.load(path / PARAMS_DIR, abstract)
    return cfg, params
