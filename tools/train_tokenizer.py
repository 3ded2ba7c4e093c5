"""Train a sentencepiece BPE tokenizer (byte fallback) on the training documents of a config.

    python tools/train_tokenizer.py CONFIG [key=value ...] --vocab-size 1024 --out runs/demo/tokenizer

Writes OUT.model and OUT.vocab; pass `data.tokenizer=OUT.model` to training. Only the training split
(data.val_fraction held out) is used, so validation text stays unseen. --vocab-size is at least 260
(256 byte pieces + pad, unk, bos, eos) and at most model.vocab_size.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rdlm.config import ConfigError, load_config  # noqa: E402
from rdlm.data import load_documents, split_documents  # noqa: E402
from rdlm.errors import ArgumentParser, cli  # noqa: E402
from rdlm.tokenizer import MIN_SP_VOCAB, train_tokenizer  # noqa: E402


def check_out(out: str) -> None:
    """--out is a file prefix in a directory that exists or can be made, and is writable."""
    if out.endswith(os.sep) or Path(out).is_dir():
        raise ConfigError(f"--out {out} is a directory; --out is a file prefix (writes OUT.model and OUT.vocab), "
                          f"e.g. --out {Path(out) / 'tokenizer'}")
    existing = next(p for p in Path(out).absolute().parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"--out {out}: cannot write there, {existing} is not a writable directory")


@cli
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="train_tokenizer.py", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="model prefix: writes OUT.model and OUT.vocab")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    most = config.model.vocab_size
    if not MIN_SP_VOCAB <= args.vocab_size <= most:
        raise ConfigError(f"--vocab-size {args.vocab_size} is out of range [{MIN_SP_VOCAB}, model.vocab_size={most}]"
                          + (f"; raise model.vocab_size to at least {MIN_SP_VOCAB}" if most < MIN_SP_VOCAB else ""))
    check_out(args.out)
    docs, _ = split_documents(load_documents(config.data), config.data.val_fraction)
    path = train_tokenizer(docs, args.out, args.vocab_size)
    print(f"wrote {path} ({args.vocab_size} pieces, {len(docs)} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
