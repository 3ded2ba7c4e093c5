"""Convert an official-format Huginn checkpoint, load it, and show logits across recurrence depths.

    python experiments/tiny_parity.py [--hf-dir tests/fixtures/tiny_fp32] [--out runs/tiny_fp32]

Default: the tiny checkpoint made with the official code (tests/fixtures). Prints, for each
num_steps, the distance to the official logits where they were recorded, how much the prediction
still moves from the previous depth (the recurrence converging), and the greedy next tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax.numpy as jnp  # noqa: E402

import rdlm  # noqa: E402
from rdlm.convert import convert  # noqa: E402
from rdlm.errors import ArgumentParser, cli  # noqa: E402
from rdlm.params import count_params  # noqa: E402


@cli
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=Path(__file__).name, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", default=str(REPO / "tests/fixtures/tiny_fp32"))
    parser.add_argument("--out", default=str(REPO / "runs/tiny_fp32"))
    parser.add_argument("--steps", default="1,2,4,8,16,32,64")
    args = parser.parse_args(argv)

    cfg = convert(args.hf_dir, args.out, overwrite=True)
    print(f"converted {args.hf_dir} -> {args.out} ({count_params(cfg):,} parameters)")
    config, params = rdlm.load_model(args.out)
    expected_file = Path(args.hf_dir) / "expected.npz"
    expected = dict(np.load(expected_file)) if expected_file.exists() else {}
    ids = expected.get("input_ids", np.arange(12, dtype=np.int32)[None] % config.model.vocab_size)
    print(f"input ids (batch {ids.shape[0]} x {ids.shape[1]}), zero initial state (init_scale=0)\n")
    print(f"{'num_steps':>9}  {'rel-L2 vs official':>18}  {'argmax agree':>12}  {'change vs previous':>18}  greedy tokens (row 0)")
    previous = None
    for steps in [int(s) for s in args.steps.split(",")]:
        logits = np.asarray(rdlm.forward(params, jnp.asarray(ids), config.model, num_steps=steps, init_scale=0.0))
        ref = expected.get(f"logits_zero_{steps}")
        rel = f"{np.linalg.norm(logits - ref) / np.linalg.norm(ref):.2e}" if ref is not None else "-"
        agree = f"{(logits.argmax(-1) == ref.argmax(-1)).mean():.1%}" if ref is not None else "-"
        change = f"{np.linalg.norm(logits - previous) / np.linalg.norm(logits):.3f}" if previous is not None else "-"
        print(f"{steps:>9}  {rel:>18}  {agree:>12}  {change:>18}  {logits[0].argmax(-1).tolist()}")
        previous = logits
    return 0


if __name__ == "__main__":
    sys.exit(main())
