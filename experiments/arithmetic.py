"""Chain sums for the reasoning task: training documents, test sets and a character-level tokenizer.

    python experiments/arithmetic.py OUT_DIR [--train 60000] [--test 500] [--seed 0]

Each document is one problem, `a+b+...=s` (2 to 4 terms of 0..99; the data pipeline adds bos and eos), the
sum written least significant digit first (`17+5+65=78` for 87): each answer digit then needs only its
column's digits and the carry, as in the length-generalisation literature, instead of the whole sum before the
first digit.
Writes OUT_DIR/train.jsonl (`{"text": ...}`, what `data.source=jsonl` reads), two prompt/answer sets for
`python -m rdlm.evaluate --answers`: test.jsonl (2 to 4 terms, as trained) and test_long.jsonl (5 and 6 terms:
longer than any training problem), the same problems as multiple choice for `--choices` (test_choices.jsonl,
test_long_choices.jsonl: the sum against two near misses, off by 1, 2 or 10), and OUT_DIR/tokenizer.model: one
piece per character, so every digit is its own token. Problems in the test sets never occur in training. Generated here (no download), from the seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rdlm.config import ConfigError  # noqa: E402
from rdlm.errors import ArgumentParser, cli  # noqa: E402
from rdlm.tokenizer import MIN_SP_VOCAB, train_tokenizer  # noqa: E402

TRAIN_TERMS = (2, 3, 4)
LONG_TERMS = (5, 6)


def problem(rng: random.Random, terms: int) -> tuple[str, str]:
    """(prompt `a+b+...=`, answer: the sum's digits least significant first) of a chain sum with `terms`
    numbers in 0..99."""
    numbers = [rng.randrange(100) for _ in range(terms)]
    return "+".join(map(str, numbers)) + "=", str(sum(numbers))[::-1]


def problems(rng: random.Random, count: int, terms: tuple[int, ...], exclude: set[str]) -> list[tuple[str, str]]:
    """`count` distinct problems (term counts uniform over `terms`) whose prompts are not in `exclude`."""
    out: dict[str, str] = {}
    while len(out) < count:
        prompt, answer = problem(rng, rng.choice(terms))
        if prompt not in exclude:
            out[prompt] = answer
    return list(out.items())


def choices(rng: random.Random, answer: str) -> tuple[list[str], int]:
    """(the answer and two near misses of it, shuffled; the answer's index), all written as answers are."""
    total, misses = int(answer[::-1]), set()
    while len(misses) < 2:
        miss = total + rng.choice((-10, -2, -1, 1, 2, 10))
        if miss >= 0 and miss != total:
            misses.add(miss)
    options = [answer, *(str(m)[::-1] for m in sorted(misses))]
    rng.shuffle(options)
    return options, options.index(answer)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@cli
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=Path(__file__).name, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=60000, help="training problems")
    parser.add_argument("--test", type=int, default=500, help="problems per test set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 1:
        raise ConfigError(f"--train {args.train} and --test {args.test} must both be at least 1")
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test = problems(rng, args.test, TRAIN_TERMS, set())
    long = problems(rng, args.test, LONG_TERMS, set())
    train = problems(rng, args.train, TRAIN_TERMS, {p for p, _ in test})
    write_jsonl(out / "train.jsonl", [{"text": p + a} for p, a in train])
    near = random.Random(args.seed + 1)  # its own stream: the problems do not depend on it
    for name, rows in (("test", test), ("test_long", long)):
        write_jsonl(out / f"{name}.jsonl", [{"prompt": p, "answer": a} for p, a in rows])
        write_jsonl(out / f"{name}_choices.jsonl", [dict(zip(("context", "choices", "answer"), (p, *choices(near, a))))
                                                    for p, a in rows])
    # no room for merges: the special and byte pieces, sentencepiece's word-boundary piece and one per character
    pieces = MIN_SP_VOCAB + 1 + len({c for p, a in train + test + long for c in p + a})
    train_tokenizer([p + a for p, a in train], out / "tokenizer", pieces)
    print(f"wrote {len(train)} training problems, {len(test)} + {len(long)} test problems and a {pieces}-piece "
          f"tokenizer to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
