"""Validation loss against test-time recurrence for a trained run, a plot of it, and a text sample.

    python experiments/recurrence_sweep.py [RUN_DIR=runs/demo] [--recurrence 1,2,4,8,16,32,64]

Loads the newest readable checkpoint of RUN_DIR, evaluates the held-out documents at each recurrence
count (same batches, same initial-state seeds for every count), prints a table, writes
`RUN_DIR/recurrence_sweep.{json,png}` and prints a short sample at the training mean recurrence.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from rdlm.checkpoint import load_run  # noqa: E402
from rdlm.inference import generate  # noqa: E402
from rdlm.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from rdlm.errors import ArgumentParser, cli  # noqa: E402
from rdlm.evaluate import heldout_batches, parse_recurrences  # noqa: E402
from rdlm.train import evaluate  # noqa: E402


def sample(params, tokenizer: Tokenizer, prompt: str, cfg, num_steps: int, length: int, seed: int = 0) -> str:
    """Temperature-0.8, top-40 sampling with the cached generator."""
    ids = tokenizer.encode(prompt)
    out = generate(params, [ids], cfg, max_new_tokens=min(length, cfg.block_size - len(ids)), num_steps=num_steps,
                   temperature=0.8, top_k=40, stop_ids=tokenizer.stop_ids, rng=jax.random.key(seed))
    new = out.tokens[0, :out.lengths[0]]
    new = new[:-1] if len(new) and new[-1] in tokenizer.stop_ids else new
    return tokenizer.decode([*ids[1:], *new])  # without bos


def plot(results: dict[int, float], mean_recurrence: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(list(results), list(results.values()), marker="o")
    ax.axvline(mean_recurrence, color="gray", linestyle="--", linewidth=1, label=f"training mean ({mean_recurrence})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test-time recurrence (core iterations)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(path.parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


@cli
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=Path(__file__).name, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default=str(REPO / "runs/demo"))
    parser.add_argument("--recurrence", default="1,2,4,8,16,32,64")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--prompt", default="ROMEO.\n")
    parser.add_argument("--sample-tokens", type=int, default=80)
    args = parser.parse_args(argv)

    run = Path(args.run_dir)
    recurrences = parse_recurrences(args.recurrence)
    config, params, step = load_run(run)
    cfg = config.model
    tokenizer = load_tokenizer(None, fallback=config.data.tokenizer, model_vocab_size=cfg.vocab_size)
    batches = heldout_batches(config, tokenizer, args.batches)
    results = evaluate(params, batches, recurrences, cfg)

    tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    print(f"{run} at step {step}: validation loss on {tokens:,} held-out tokens "
          f"(trained with mean recurrence {cfg.mean_recurrence})\n")
    print(f"{'recurrence':>10}  {'loss':>7}  {'perplexity':>10}")
    for r, loss in results.items():
        print(f"{r:>10}  {loss:7.4f}  {np.exp(loss):10.2f}")
    (run / "recurrence_sweep.json").write_text(json.dumps({"step": step, "tokens": tokens, "loss": results}))
    plot(results, cfg.mean_recurrence, run / "recurrence_sweep.png")
    print(f"\nwrote {run / 'recurrence_sweep.png'} and {run / 'recurrence_sweep.json'}")
    text = sample(params, tokenizer, args.prompt, cfg, cfg.mean_recurrence, args.sample_tokens)
    print(f"\nsample at recurrence {cfg.mean_recurrence}:\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
