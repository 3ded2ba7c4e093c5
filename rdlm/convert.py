"""Convert Huginn checkpoints: official HF format (safetensors) <-> rdlm model checkpoint (Orbax).

    python -m rdlm.convert SRC_HF_DIR DST_RDLM_DIR [--dtype bfloat16]
    python -m rdlm.convert --export SRC_RDLM_DIR DST_HF_DIR [--dtype float32]

Import streams tensor by tensor into Orbax partial saves: peak memory is about twice the largest
tensor (the embedding), not the model. Every problem with the source (missing, unexpected or mis-shaped tensors, truncated or
corrupt files) is reported before anything is written, and the destination appears only when the
conversion has succeeded (it is built in a temporary sibling directory, then renamed). The tokenizer
files of the source (tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
tokenizer.model: those present) are checked against the model's vocab_size and copied along, so that
the checkpoint carries its tokenizer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from rdlm.checkpoint import CONFIG_FILE, PARAMS_DIR, load_model, refuse_overlap, staging_dir, write_manifest
from rdlm.config import Config, ModelConfig, dump_config
from rdlm.errors import ArgumentParser, cli
from rdlm.hf import iter_hf_params, read_hf, write_hf
from rdlm.params import count_params, unflatten
from rdlm.progress import track
from rdlm.tokenizer import HF_FILE, SP_FILE, TOKENIZER_FILES, load_tokenizer

SAVE_BATCH_BYTES = 256 * 2**20  # small tensors are gathered up to this size per Orbax partial save


def _save_context() -> ocp.Context:
    """Uncompressed saving: zstd would keep a second encoded copy of each tensor in memory (and gains
    little on weights)."""
    context = ocp.Context()
    context.array.saving.use_compression = False
    return context


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = None, overwrite: bool = False) -> ModelConfig:
    """HF directory -> rdlm model checkpoint, tensor by tensor, with the tokenizer files it holds."""
    refuse_overlap(src, dst)
    cfg, pairs = read_hf(src)
    if any((Path(src) / f).is_file() for f in (HF_FILE, SP_FILE)):
        load_tokenizer(src, model_vocab_size=cfg.vocab_size)  # a tokenizer that does not load or fit fails here
    with staging_dir(Path(dst), overwrite) as tmp, _save_context():
        batch: dict[tuple, np.ndarray] = {}
        for spec, x in track(iter_hf_params(pairs, dtype), "converting tensors", total=len(pairs)):
            if batch and sum(a.nbytes for a in batch.values()) + x.nbytes > SAVE_BATCH_BYTES:
                ocp.partial.save(tmp / PARAMS_DIR, unflatten(batch))
                batch = {}
            batch[spec.path] = x
        ocp.partial.save(tmp / PARAMS_DIR, unflatten(batch))
        ocp.partial.finalize(tmp / PARAMS_DIR)
        write_manifest(tmp)
        dump_config(Config(model=cfg), tmp / CONFIG_FILE)
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file():
                shutil.copyfile(Path(src) / name, tmp / name)
    return cfg


def export(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = None, overwrite: bool = False,
           max_shard_bytes: int = 5 * 2**30) -> None:
    """rdlm model checkpoint -> HF directory the official `RavenForCausalLM.from_pretrained` loads."""
    refuse_overlap(src, dst)
    config, params = load_model(src)
    write_hf(params, config.model, dst, dtype, overwrite, max_shard_bytes)


@cli
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m rdlm.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--export", action="store_true", help="rdlm checkpoint -> HF directory")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="cast the weights (default: keep the stored dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    if args.export:
        export(args.src, args.dst, args.dtype, args.overwrite)
        print(f"exported {args.src} -> {args.dst}")
    else:
        cfg = convert(args.src, args.dst, args.dtype, args.overwrite)
        tokenizer = [f for f in TOKENIZER_FILES if (Path(args.dst) / f).is_file()]
        print(f"converted {args.src} -> {args.dst}: {count_params(cfg):,} parameters; tokenizer files: "
              f"{', '.join(tokenizer) or 'none in the source (pass --tokenizer PATH when generating)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
