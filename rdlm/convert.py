"""Convert Huginn checkpoints: official HF format (safetensors) <-> rdlm model checkpoint (Orbax).

    python -m rdlm.convert SRC_HF_DIR DST_RDLM_DIR [--dtype bfloat16]
    python -m rdlm.convert --export SRC_RDLM_DIR DST_HF_DIR [--dtype float32]

Import streams tensor by tensor (peak memory ~ one batch of tensors, not the model) into Orbax
partial saves. Every problem with the source (missing, unexpected or mis-shaped tensors, truncated or
corrupt files) is reported before anything is written, and the destination appears only when the
conversion has succeeded (it is built in a temporary sibling directory, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from safetensors.numpy import save_file

from rdlm.checkpoint import CONFIG_FILE, PARAMS_DIR, CheckpointError, load_model
from rdlm.config import Config, ConfigError, ModelConfig, dump_config
from rdlm.model import rope_angles
from rdlm.params import (ROPE_BUFFER, TIED_HEAD, ParamSpec, count_params, get_path, param_specs, rope_buffer_shape,
                         unflatten)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
           "F64": np.dtype(np.float64)}
_NAMES = {v: k for k, v in _DTYPES.items()}
SAVE_BATCH_BYTES = 512 * 2**20  # tensors gathered per Orbax partial save while importing


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
    base, entries = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
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


def read_tensor(entry: TensorEntry) -> np.ndarray:
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        data = np.fromfile(f, dtype=entry.dtype, count=(entry.end - entry.start) // entry.dtype.itemsize)
    if data.nbytes != entry.end - entry.start:
        raise CheckpointError(f"{entry.file}: truncated while reading {entry.name}")
    return data.reshape(entry.shape)


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


@contextmanager
def _staging(dst: Path, overwrite: bool) -> Iterator[Path]:
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


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = None, overwrite: bool = False) -> ModelConfig:
    """HF directory -> rdlm model checkpoint, tensor by tensor."""
    cfg, pairs = read_hf(src)
    with _staging(Path(dst), overwrite) as tmp:
        batch: dict[tuple, np.ndarray] = {}
        for spec, x in iter_hf_params(pairs, dtype):
            batch[spec.path] = x
            if sum(a.nbytes for a in batch.values()) >= SAVE_BATCH_BYTES:
                ocp.partial.save(tmp / PARAMS_DIR, unflatten(batch))
                batch = {}
        if batch:
            ocp.partial.save(tmp / PARAMS_DIR, unflatten(batch))
        ocp.partial.finalize(tmp / PARAMS_DIR)
        dump_config(Config(model=cfg), tmp / CONFIG_FILE)
    return cfg


def export(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = None, overwrite: bool = False,
           max_shard_bytes: int = 5 * 2**30) -> None:
    """rdlm model checkpoint -> HF directory the official `RavenForCausalLM.from_pretrained` loads."""
    config, params = load_model(src)
    cfg = config.model
    tensors: list[tuple[str, np.ndarray]] = []
    for spec in param_specs(cfg):
        x = spec.to_hf(np.asarray(get_path(params, spec.path)))
        tensors.append((spec.hf_name, x if dtype is None else x.astype(jnp.dtype(dtype))))
    out_dtype = tensors[0][1].dtype
    cos, sin = rope_angles(np.arange(cfg.block_size)[None], cfg.head_dim, cfg.rope_base)
    rope = np.stack([np.asarray(cos), np.asarray(sin)], axis=-1).reshape(rope_buffer_shape(cfg))
    tensors.insert(0, (ROPE_BUFFER, rope.astype(out_dtype)))
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    for name, x in tensors:
        if shards[-1] and sum(t.nbytes for _, t in shards[-1]) + x.nbytes > max_shard_bytes:
            shards.append([])
        shards[-1].append((name, x))
    with _staging(Path(dst), overwrite) as tmp:
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        for file, shard in zip(names, shards):
            save_file({n: np.ascontiguousarray(x) for n, x in shard}, tmp / file, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(x.nbytes for _, x in tensors)},
                     "weight_map": {n: file for file, shard in zip(names, shards) for n, _ in shard}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        hf = cfg.to_hf_dict(torch_dtype=out_dtype.name)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdlm.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--export", action="store_true", help="rdlm checkpoint -> HF directory")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="cast the weights (default: keep the stored dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        if args.export:
            export(args.src, args.dst, args.dtype, args.overwrite)
        else:
            cfg = convert(args.src, args.dst, args.dtype, args.overwrite)
            print(f"converted {args.src} -> {args.dst}: {count_params(cfg):,} parameters")
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
