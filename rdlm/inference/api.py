"""`rdlm.generate`: check the arguments, pad the prompts, place the parameters, run the compiled program."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdlm.config import Config, ModelConfig, RulesConfig
from rdlm.inference import engine
from rdlm.inference.checks import (MAX_STEPS, GenerateError, check_batch_split, check_range, check_rng,
                                   check_strategy, padded_prompts)
from rdlm.inference.criteria import CRITERIA
from rdlm.inference.engine import Generation, Knobs, Spec
from rdlm.inference.memory import CPU_UPCAST_HINT, check_memory
from rdlm.inference.sampling import Sampling
from rdlm.sharding import activate, named, param_partition_specs

Params = dict[str, Any]


def generate(params: Params, input_ids: Any, config: ModelConfig | Config, *, max_new_tokens: int, num_steps: int,
             init_scale: float = 1.0, exit_criterion: str | None = None, exit_threshold: float | None = None,
             exit_in_prefill: bool = True, cache_strategy: str = "full", temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, stop_ids: Sequence[int] = (), continuous: bool = False,
             draft_steps: int | None = None, lookahead: int = 4, verification_threshold: float = 1.0,
             prompt_lengths: Any = None, rng: jax.Array | None = None,
             mesh: jax.sharding.Mesh | None = None, rules: RulesConfig | None = None) -> Generation:
    """Generate up to `max_new_tokens` per prompt with `num_steps` recurrences per token (the cap, with an exit).

    `input_ids`: `[batch, seq]` ids (with `prompt_lengths` when rows are right-padded) or a list of id
    sequences of different lengths. `temperature` 0 is greedy; otherwise sample with top-k (0 = off),
    top-p (1 = off), min-p (0 = off). `exit_criterion`: one of `CRITERIA` (threshold default: the
    official one); `cache_strategy`: one of `STRATEGIES` (with compress strategies, an entry a token never
    computed is skipped, where the official raises). `continuous`: warm-start each token's latent from
    the previous token's final one (the raw core output, as the official adaptive path; its
    `generate_minimal` carries the latent after ln_f). `draft_steps`: self-speculative decoding with
    `lookahead` drafted tokens per verification (with sampling, like the official, this does not
    preserve the sampling distribution). Generation stops per row at a token in `stop_ids`. `rng`
    (default `jax.random.key(0)`, so repeated calls agree) draws initial latents and samples. With
    `mesh`, parameters, cache and activations are sharded by `rules` (default `RulesConfig()`), as in training.
    """
    cfg = config.model if isinstance(config, Config) else config
    check_range("num_steps", num_steps, 1, MAX_STEPS, integer=True)
    check_range("max_new_tokens", max_new_tokens, 1, cfg.block_size - 1, integer=True)
    check_range("init_scale", init_scale, 0.0, 1e6)
    check_rng(rng)
    criterion = exit_criterion or "none"
    if criterion not in CRITERIA:
        raise GenerateError(f"unknown exit_criterion={exit_criterion!r}; valid: {', '.join(CRITERIA)}")
    crit = CRITERIA[criterion]
    threshold = crit.default if exit_threshold is None else exit_threshold
    if exit_threshold is not None:
        if criterion == "none":
            raise GenerateError("exit_threshold was given without an exit_criterion")
        check_range(f"exit_threshold for {criterion}", threshold, *crit.valid, low_open=True, integer=crit.counting)
    check_strategy(cache_strategy, cfg)
    check_range("temperature", temperature, 0.0, math.inf)
    check_range("top_p", top_p, 0.0, 1.0, low_open=True)
    check_range("min_p", min_p, 0.0, 1.0)
    check_range("top_k", top_k, 0, cfg.vocab_size, integer=True)
    stop_ids = np.asarray(stop_ids, np.int64).reshape(-1)
    if ((stop_ids < 0) | (stop_ids >= cfg.vocab_size)).any():
        raise GenerateError(f"stop_ids {stop_ids.tolist()} must lie in [0, vocab_size={cfg.vocab_size})")
    if draft_steps is not None:
        check_range("draft_steps", draft_steps, 1, num_steps, integer=True)
        check_range("lookahead", lookahead, 1, cfg.block_size, integer=True)
        check_range("verification_threshold", verification_threshold, 0.0, 1.0, low_open=True)
        if criterion != "none" or continuous:
            raise GenerateError("speculative decoding (draft_steps) does not combine with exit_criterion or continuous")
    prompt, lengths = padded_prompts(input_ids, prompt_lengths, max_new_tokens, cfg)
    speculative = draft_steps is not None
    spec = Spec(num_steps=int(num_steps), max_new_tokens=int(max_new_tokens), criterion=criterion,
                strategy=cache_strategy, sample=temperature > 0, continuous=continuous,
                exit_in_prefill=exit_in_prefill, draft_steps=int(draft_steps or 0), lookahead=int(lookahead))
    T = prompt.shape[1] + max_new_tokens + (lookahead if speculative else 0)
    knobs = Knobs(jnp.float32(init_scale), jnp.float32(threshold), jnp.float32(verification_threshold),
                  Sampling(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p)))
    check_memory(params, cfg, spec, len(prompt), prompt.shape[1], T, mesh)
    context = contextlib.nullcontext()
    if mesh is not None:
        rules = rules or RulesConfig()
        check_batch_split(len(prompt), mesh, rules)
        params = jax.device_put(params, named(mesh, param_partition_specs(cfg, rules, mesh)))
        context = activate(mesh, rules)
    stops = np.full((-(-len(stop_ids) // 8) * 8,), -1, np.int32)  # padded: a few stop-list lengths, few compiles
    stops[:len(stop_ids)] = stop_ids
    run = engine.decode_speculative if speculative else engine.decode
    try:
        with context:
            out = run(params, jnp.asarray(prompt), jnp.asarray(lengths), jnp.asarray(stops),
                      jax.random.key(0) if rng is None else rng, knobs, cfg=cfg, spec=spec, T=T,
                      mesh=None if mesh is None else (mesh, rules))  # a mesh is a new program
            out = jax.device_get(out)
    except jax.errors.JaxRuntimeError as e:  # the estimate is a lower bound: XLA's temporaries may not fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise GenerateError(f"out of memory while generating: {str(e).splitlines()[0]}",
                            hint="lower num_steps, max_new_tokens or the number of prompts, or use a "
                                 "compress-s<n> or compress-anchor cache_strategy"
                                 + (CPU_UPCAST_HINT if jax.default_backend() == "cpu"
                                    and jnp.dtype(cfg.dtype).itemsize < 4 else "")) from e
    return out._replace(verify_passes=int(out.verify_passes))
