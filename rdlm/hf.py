"""The official HF checkpoint format of Huginn: safetensors files (single or sharded) and config.json.

Reads headers first and validates every tensor against the parameter table (`rdlm.params`) before
any data is read; then reads one tensor at a time. Also writes the format back (`write_hf`), as the
official `save_pretrained` does: the RoPE buffer included, the tied `lm_head.weight` left out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from rdlm.checkpoint import CheckpointError, staging_dir
from rdlm.config import ConfigError, ModelConfig
from rdlm.model import rope_angles
from rdlm.params import (EMBEDDING, ROPE_BUFFER, TIED_HEAD, ParamSpec, get_path, param_specs, rope_buffer_shape,
                         spec_at, unflatten)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
           "F64": np.dtype(np.float64)}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file (byte offsets are absolute)."""
    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header and check that every tensor's bytes are inside the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > size - 8:
                raise CheckpointError(f"{file}: truncated or not a safetensors file (header length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header: not a JSON object")
    base, entries = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if isinstance(info, dict) and info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{file}: {name} has dtype {info.get('dtype')}; supported: {', '.join(_DTYPES)}")
        try:
            dtype, shape, (start, end) = _DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: corrupt header entry for {name!r}: {info!r}") from e
        if end - start != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{file}: corrupt header: {name} has {end - start} bytes for shape {list(shape)}")
        if base + end > size:
            raise CheckpointError(f"{file}: truncated: {name} ends at byte {base + end}, the file has {size} bytes")
        entries[name] = TensorEntry(name, file, dtype, shape, base + start, base + end)
    return entries


def read_tensor(entry: TensorEntry, start: int = 0, count: int | None = None) -> np.ndarray:
    """The whole tensor, or `count` flat elements from element `start` (for chunked reads)."""
    whole = count is None
    count = int(np.prod(entry.shape)) - start if whole else count
    with open(entry.file, "rb") as f:
        f.seek(entry.start + start * entry.dtype.itemsize)
        data = np.fromfile(f, dtype=entry.dtype, count=count)
    if data.size != count:
        raise CheckpointError(f"{entry.file}: truncated while reading {entry.name}")
    return data.reshape(entry.shape) if whole else data


def _check_tied_head(entries: dict[str, TensorEntry], embedding: str, chunk: int = 2**24) -> None:
    """A stored `lm_head.weight` of a tied model must equal the embedding (compared in chunks)."""
    head, wte = entries[TIED_HEAD], entries[embedding]
    total = int(np.prod(wte.shape))
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        if not np.array_equal(read_tensor(head, start, n).astype(np.float32), read_tensor(wte, start, n).astype(np.float32)):
            raise CheckpointError(f"{head.file}: {TIED_HEAD} differs from {embedding}, but config.json ties the "
                                  "embeddings (tie_embeddings=true); refusing to drop a distinct head")


def hf_index(src: Path) -> dict[str, TensorEntry]:
    """All tensors of an HF directory: a single `model.safetensors` or shards with an index."""
    if (src / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((src / INDEX_FILE).read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{src / INDEX_FILE}: corrupt index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise CheckpointError(f"{src / INDEX_FILE} names shard files that do not exist: {', '.join(missing)}")
        entries = {}
        for file in files:
            entries.update(read_safetensors_header(src / file))
        misplaced = [f"{name} (index says {file})" for name, file in weight_map.items()
                     if name not in entries or entries[name].file.name != file]
        if misplaced:
            raise CheckpointError(f"{src / INDEX_FILE}: tensors not found where the index says: {', '.join(misplaced)}")
        return entries
    if (src / SINGLE_FILE).is_file():
        return read_safetensors_header(src / SINGLE_FILE)
    raise CheckpointError(f"{src}: no {SINGLE_FILE} and no {INDEX_FILE}")


def match_tensors(cfg: ModelConfig, entries: dict[str, TensorEntry], src: Path) -> list[tuple[ParamSpec, TensorEntry]]:
    """Pair every table row with its tensor; one error lists every missing, unexpected or mis-shaped one."""
    specs = {s.hf_name: s for s in param_specs(cfg)}
    known = {ROPE_BUFFER: rope_buffer_shape(cfg)}  # recognised buffers: checked, then not used
    if cfg.tie_embeddings:
        known[TIED_HEAD] = (cfg.vocab_size, cfg.n_embd)  # the tied head, when saved, is the embedding
    problems = [f"  missing    {n} (expected {list(s.hf_shape)})" for n, s in specs.items() if n not in entries]
    for name, entry in entries.items():
        want = specs[name].hf_shape if name in specs else known.get(name)
        if want is None:
            problems.append(f"  unexpected {name} (found {list(entry.shape)} in {entry.file.name})")
        elif entry.shape != want:
            problems.append(f"  mis-shaped {name}: expected {list(want)}, found {list(entry.shape)} in {entry.file.name}")
    if problems:
        raise CheckpointError(f"{src} does not match its config.json ({len(problems)} problems):\n" + "\n".join(problems))
    if cfg.tie_embeddings and TIED_HEAD in entries:
        _check_tied_head(entries, spec_at(cfg, EMBEDDING).hf_name)
    return [(s, entries[n]) for n, s in specs.items()]


def read_hf(src: str | os.PathLike) -> tuple[ModelConfig, list[tuple[ParamSpec, TensorEntry]]]:
    """Config and validated tensor list of an HF directory; reads headers only."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such checkpoint directory")
    try:
        cfg = ModelConfig.from_hf_json(src / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    return cfg, match_tensors(cfg, hf_index(src), src)


def iter_hf_params(pairs: list[tuple[ParamSpec, TensorEntry]], dtype: Any = None) -> Iterator[tuple[ParamSpec, np.ndarray]]:
    """Stream (spec, tensor in our layout) one at a time, cast to `dtype` when given."""
    for spec, entry in pairs:
        x = spec.from_hf(read_tensor(entry))
        yield spec, (x if dtype is None else x.astype(jnp.dtype(dtype)))


def load_hf_checkpoint(path: str | os.PathLike, dtype: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
    """An HF-format huginn directory -> (ModelConfig, params as jax arrays); `dtype` casts (default: as stored)."""
    cfg, pairs = read_hf(path)
    return cfg, unflatten({spec.path: jnp.asarray(x) for spec, x in iter_hf_params(pairs, dtype)})


def write_hf(params: dict[str, Any], cfg: ModelConfig, dst: str | os.PathLike, dtype: Any = None,
             overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> None:
    """Parameters -> HF directory (safetensors, sharded past `max_shard_bytes`) that the official code loads."""
    tensors = [(s.hf_name, s.to_hf(np.asarray(get_path(params, s.path)))) for s in param_specs(cfg)]
    if dtype is not None:
        tensors = [(name, x.astype(jnp.dtype(dtype))) for name, x in tensors]
    out_dtype = tensors[0][1].dtype
    cos, sin = rope_angles(np.arange(cfg.block_size)[None], cfg.head_dim, cfg.rope_base)
    rope = np.stack([np.asarray(cos), np.asarray(sin)], axis=-1).reshape(rope_buffer_shape(cfg))
    tensors.insert(0, (ROPE_BUFFER, rope.astype(out_dtype)))  # the official saves its persistent RoPE buffer
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    for name, x in tensors:
        if shards[-1] and sum(t.nbytes for _, t in shards[-1]) + x.nbytes > max_shard_bytes:
            shards.append([])
        shards[-1].append((name, x))
    with staging_dir(Path(dst), overwrite) as tmp:
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        for file, shard in zip(names, shards):
            save_file({n: np.ascontiguousarray(x) for n, x in shard}, tmp / file, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(x.nbytes for _, x in tensors)},
                     "weight_map": {n: file for file, shard in zip(names, shards) for n, _ in shard}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(torch_dtype=out_dtype.name), indent=2))
