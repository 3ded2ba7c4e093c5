"""Train a sentencepiece BPE tokenizer (byte fallback) on the training documents of a config.

    python tools/train_tokenizer.py CONFIG [key=value ...] --vocab-size 1024 --out runs/demo/tokenizer

Writes OUT.model and OUT.vocab; pass `data.tokenizer=OUT.model` to training. Only the training split
(data.val_fraction held out) is used, so validation text stays unseen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rdlm.config import ConfigError, load_config  # noqa: E402
from rdlm.data import load_documents, split_documents  # noqa: E402
from rdlm.tokenizer import train_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="model prefix: writes OUT.model and OUT.vocab")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.vocab_size > config.model.vocab_size:
            raise ConfigError(f"--vocab-size {args.vocab_size} exceeds model.vocab_size={config.model.vocab_size}")
        docs, _ = split_documents(load_documents(config.data), config.data.val_fraction)
        path = train_tokenizer(docs, args.out, args.vocab_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.vocab_size} pieces, {len(docs)} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
