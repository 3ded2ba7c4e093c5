"""`python -m rdlm.inference`: generate from an rdlm checkpoint, a training run folder or an HF huginn directory.

Every token runs prelude -> r recurrences of the core -> coda, with a KV cache entry per (recurrence
step, core layer). Per-token adaptive compute: `--exit-criterion` (the official ones and thresholds)
ends a token's recurrence early; `--cache-strategy` says what later tokens attend to where an earlier
token exited (the official lookup strategies). `--continuous` warm-starts each token's latent from the
previous token's final one; `--draft-steps` turns on self-speculative decoding (draft with few steps,
verify a block with `--num-steps`, keep the agreeing prefix).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdlm.checkpoint import CONFIG_FILE, PARAMS_DIR, load_model, load_run
from rdlm.config import Config, with_overrides
from rdlm.errors import ArgumentParser, cli
from rdlm.hf import load_hf_checkpoint
from rdlm.inference.api import generate
from rdlm.inference.cache import STRATEGIES
from rdlm.inference.checks import GenerateError, check_range
from rdlm.inference.criteria import CRITERIA
from rdlm.params import abstract_params
from rdlm.sharding import make_mesh
from rdlm.tokenizer import Tokenizer, load_tokenizer

Params = dict[str, Any]


def load_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, Params]:
    """(config, params) from an rdlm model checkpoint, a training run folder or an HF huginn directory.

    `overrides` (`model.dtype=bfloat16`, ...) may change how the model computes, not its shapes. Weights wider
    than the compute dtype `model.dtype` are narrowed to it (every use casts them to it: no number changes, less
    memory); on CPU narrower ones are also widened to it, since XLA:CPU runs bf16 matmuls in fp32 and would
    keep an fp32 copy of every bf16 weight besides it (huginn-0125's bf16 weights in an fp32 model: 14.6 GiB
    peak RSS widened on load; computed in bf16, 7.1 GB of weights plus a 14.26 GB allocation).
    """
    path = Path(path)
    if not path.is_dir():
        raise GenerateError(f"checkpoint {path} does not exist or is not a directory")
    if (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir():
        config, params = load_model(path)
    elif (path / CONFIG_FILE).is_file():
        config, params, _ = load_run(path)
    elif (path / "config.json").is_file():
        model_cfg, params = load_hf_checkpoint(path)
        config = Config(model=model_cfg)
    else:
        raise GenerateError(f"{path} holds no checkpoint: expected {CONFIG_FILE} + {PARAMS_DIR}/ (rdlm checkpoint), "
                            f"{CONFIG_FILE} + checkpoints/ (training run) or config.json + *.safetensors (HF)")
    if overrides:
        new = with_overrides(config, list(overrides))
        if jax.tree.map(lambda x: x.shape, abstract_params(new.model)) != jax.tree.map(lambda x: x.shape, params):
            raise GenerateError(f"overrides {list(overrides)} change parameter shapes; only settings such as "
                                "model.dtype can be overridden at generation time")
        config = new
    leaves, treedef = jax.tree.flatten(params)
    del params  # the leaves list holds the only references: `_cast_in_place` frees each source leaf
    _cast_in_place(leaves, jnp.dtype(config.model.dtype), widen=jax.default_backend() == "cpu")
    return config, jax.tree.unflatten(treedef, leaves)


def _cast_in_place(leaves: list[Any], dtype: np.dtype, widen: bool) -> None:
    """Cast the arrays of `leaves` wider than `dtype` (and, with `widen`, the narrower ones) to `dtype`, one at
    a time, freeing each source once cast: the peak is about the larger of the two trees, not their sum."""
    for i in range(len(leaves)):
        if leaves[i].dtype.itemsize > dtype.itemsize or (widen and leaves[i].dtype != dtype):
            leaves[i] = leaves[i].astype(dtype)


def _as_flags(message: str, names: Iterable[str]) -> str:
    """An API error message in the command line's terms: each keyword in `names` (filled from the flag of the
    same name) is written as the flag, `top_p=inf` -> `--top-p=inf`."""
    return re.sub(rf"\b({'|'.join(names)})\b", lambda m: "--" + m[1].replace("_", "-"), message)


def _encode_prompts(tok: Tokenizer, texts: list[str], chat: bool, system: str | None) -> list[np.ndarray]:
    """Token ids of each `--prompt`; a text the tokenizer keeps nothing of is refused (bos alone is no prompt)."""
    prompts = []
    for i, text in enumerate(texts):
        if chat:
            messages = [{"role": "system", "content": system}] if system else []
            prompts.append(tok.encode_chat(messages + [{"role": "user", "content": text}]))
        else:
            prompts.append(tok.encode(text))
            if len(prompts[-1]) == 1:
                raise GenerateError(f"prompt {i} (--prompt {text!r}) encodes to no tokens with tokenizer "
                                    f"{tok.source}: its vocabulary has none of the text's characters")
    return prompts


@cli
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m rdlm.inference", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.dtype=bfloat16")
    parser.add_argument("--checkpoint", required=True, help="rdlm checkpoint, training run folder or HF directory")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--num-steps", type=int, default=32, help="recurrences per token (the cap, with an exit)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--exit-criterion", choices=list(CRITERIA), default=None)
    parser.add_argument("--exit-threshold", type=float, default=None, help="default: the official one per criterion")
    parser.add_argument("--cache-strategy", default="full", help=f"one of {', '.join(STRATEGIES)}")
    parser.add_argument("--continuous", action="store_true", help="warm-start each token from the previous latent")
    parser.add_argument("--init-scale", type=float, default=1.0, help="initial latent noise (0: zeros)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draft-steps", type=int, default=None, help="self-speculative decoding: draft depth")
    parser.add_argument("--lookahead", type=int, default=4, help="drafted tokens per verification")
    parser.add_argument("--verification-threshold", type=float, default=1.0)
    parser.add_argument("--chat", action="store_true", help="format the prompt with the tokenizer's chat template")
    parser.add_argument("--system", default=None, help="system message for --chat")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: from --checkpoint)")
    parser.add_argument("--sharded", action="store_true",
                        help="shard over all devices by the config's mesh.* and mesh.rules.* (overridable)")
    args = parser.parse_args(argv)
    empty = [i for i, text in enumerate(args.prompt) if not text.strip()]
    if empty:
        raise GenerateError(f"prompt {empty[0]} (--prompt {args.prompt[empty[0]]!r}) is empty; every prompt needs "
                            "some text (prompts count from 0 in the order given)")
    check_range("--seed", args.seed, -2**63, 2**63 - 1, integer=True)  # what jax.random.key takes
    config, params = load_checkpoint(args.checkpoint, args.overrides)
    tok = load_tokenizer(args.checkpoint, path=args.tokenizer, model_vocab_size=config.model.vocab_size,
                         fallback=config.data.tokenizer or None)
    prompts = _encode_prompts(tok, args.prompt, args.chat, args.system)
    kwargs = dict(max_new_tokens=args.max_new_tokens, num_steps=args.num_steps, init_scale=args.init_scale,
                  exit_criterion=args.exit_criterion, exit_threshold=args.exit_threshold,
                  cache_strategy=args.cache_strategy, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, min_p=args.min_p, stop_ids=tok.stop_ids, continuous=args.continuous,
                  draft_steps=args.draft_steps, lookahead=args.lookahead,
                  verification_threshold=args.verification_threshold, rng=jax.random.key(args.seed))
    if args.sharded:
        kwargs |= dict(mesh=make_mesh(config.mesh), rules=config.mesh.rules)
    try:
        out = generate(params, prompts, config, **kwargs)
    except GenerateError as e:
        flags = kwargs.keys() & vars(args).keys()
        raise GenerateError(_as_flags(str(e), flags), hint=e.hint and _as_flags(e.hint, flags)) from e
    for i, text in enumerate(args.prompt):
        n = int(out.lengths[i])
        steps = out.steps[i, :n]
        print(f"--- prompt {i}: {text!r}\n{tok.decode(out.tokens[i, :n])}")
        print(f"[{n} tokens, {steps.mean():.2f} recurrence steps per token (min {steps.min()}, max {steps.max()})]")
    return 0

