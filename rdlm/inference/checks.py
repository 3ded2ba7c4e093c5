"""Input checks of the generation API: every bad argument is refused by name with its valid range, before
anything is compiled."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from rdlm.config import ModelConfig, RulesConfig
from rdlm.errors import RdlmError
from rdlm.inference.cache import STRATEGIES
from rdlm.sharding import shards

MAX_STEPS = 2**31 - 1  # recurrence counters are int32


class GenerateError(RdlmError, ValueError):
    """Bad generation input; the message names the argument and its valid range."""


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                integer: bool = False) -> None:
    """`value` in [low, high] (or (low, high]), a finite real number (an integer when `integer`), else a
    named error. NaN and infinities are refused: they pass no comparison, or turn the sampler degenerate."""
    valid = f"{'(' if low_open else '['}{low}, {high}{')' if high == math.inf else ']'}"
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not (is_int or isinstance(value, (float, np.floating))):
        raise GenerateError(f"{name}={value!r} must be {'an integer' if integer else 'a number'} in {valid}")
    if not (is_int or math.isfinite(value)):
        raise GenerateError(f"{name}={value} is not a finite number; valid range is {valid}")
    if integer and not (is_int or float(value).is_integer()):
        raise GenerateError(f"{name}={value!r} must be an integer in {valid}")
    if not ((value > low if low_open else value >= low) and value <= high):
        raise GenerateError(f"{name}={value} is out of range; valid range is {valid}")


def check_strategy(strategy: str, cfg: ModelConfig) -> None:
    if strategy.startswith("compress-s"):
        n = strategy.removeprefix("compress-s")
        c = cfg.n_layers_in_recurrent_block
        if not n.isdigit() or int(n) < c or int(n) % c:
            raise GenerateError(f"cache_strategy={strategy!r}: compress-s<n> counts core-layer entries; n must be a "
                                f"positive multiple of the core depth {c} (e.g. compress-s{c})")
    elif strategy not in STRATEGIES:
        raise GenerateError(f"unknown cache_strategy={strategy!r}; valid: {', '.join(STRATEGIES)}")


def check_rng(rng: Any) -> None:
    if rng is not None and not (isinstance(rng, jax.Array) and jax.numpy.issubdtype(rng.dtype, jax.dtypes.prng_key)):
        raise GenerateError(f"rng must be a key from jax.random.key(seed), got {type(rng).__name__}")


def check_batch_split(batch: int, mesh: jax.sharding.Mesh, rules: RulesConfig) -> None:
    """The prompts must split evenly over the mesh axes of the `batch` rule (the cache and activations do)."""
    ways = shards(rules, mesh, "batch")
    if batch % ways:
        raise GenerateError(f"{batch} prompt(s) do not split over the mesh axes {rules.batch} of the batch rule "
                            f"({ways} ways); pass a multiple of {ways} prompts",
                            hint="or replicate the batch on every device with mesh.rules.batch=null")


def padded_prompts(input_ids: Any, prompt_lengths: Any, max_new_tokens: int,
                   cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded `[b, bucket]` ids and lengths `[b]` from an array (+ lengths) or a list of sequences."""
    if isinstance(input_ids, (list, tuple)) and input_ids and np.ndim(input_ids[0]) > 0:
        if prompt_lengths is not None:
            raise GenerateError("prompt_lengths is for a padded [batch, seq] array; a list of sequences has its own")
        rows = [np.asarray(r).reshape(-1) for r in input_ids]
        lengths = np.asarray([len(r) for r in rows], np.int32)
    else:
        arr = np.asarray(input_ids)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise GenerateError(f"input_ids must be [batch, seq] or a list of sequences, got shape {list(arr.shape)}")
        lengths = np.full((arr.shape[0],), arr.shape[1]) if prompt_lengths is None else np.asarray(prompt_lengths)
        if (lengths.shape != (arr.shape[0],) or not np.issubdtype(lengths.dtype, np.integer)
                or (lengths < 1).any() or (lengths > arr.shape[1]).any()):
            raise GenerateError(f"prompt_lengths={lengths.tolist()} must be {arr.shape[0]} integers in "
                                f"[1, {arr.shape[1]}] for input_ids of shape {list(arr.shape)}")
        lengths = lengths.astype(np.int32)
        rows = [arr[i, :n] for i, n in enumerate(lengths)]
    if not rows or (lengths == 0).any():
        raise GenerateError("empty prompt: every prompt needs at least one token (e.g. the tokenizer's bos)")
    for i, r in enumerate(rows):
        if not np.issubdtype(r.dtype, np.integer) or (r < 0).any() or (r >= cfg.vocab_size).any():
            raise GenerateError(f"prompt {i} has token ids outside [0, vocab_size={cfg.vocab_size})")
    if lengths.max() + max_new_tokens > cfg.block_size:
        raise GenerateError(f"prompt of {lengths.max()} tokens + max_new_tokens={max_new_tokens} exceeds the context "
                            f"block_size={cfg.block_size}; shorten the prompt or lower max_new_tokens")
    bucket = min(max(16, 1 << int(lengths.max() - 1).bit_length()), cfg.block_size - max_new_tokens)  # fewer compiles
    out = np.zeros((len(rows), bucket), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, lengths
