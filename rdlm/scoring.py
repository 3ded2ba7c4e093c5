"""Log-likelihood scoring: the log-probability a model gives a continuation after a context, batched.

What evaluation harnesses ask of a language model besides generation: `loglikelihoods` gives, for each
(context ids, continuation ids) pair, the summed log-probability of the continuation and whether greedy
decoding would have produced it (multiple-choice scoring); `rolling_loglikelihood` gives a whole
document's log-probability over windows of at most `block_size` tokens (perplexity), the windows being
lm-eval's `loglikelihood_rolling` ones (`rolling_windows`).

Rows of different lengths are right-padded (causal attention: a real token never sees the padding after
it, positions stay 0..n-1) to a bucketed length, and the batch to a bucketed row count, so a whole
evaluation compiles a handful of programs. `num_steps` is traced: one compile serves every depth.

Each row starts from the initial latent `rdlm.forward` draws for that row alone from `rng` (JAX's
default partitionable threefry draws position i's noise independently of the sequence length), so a
row's score is independent of what it is batched with and equals scoring it with `rdlm.forward`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdlm import model
from rdlm.config import Config, ModelConfig

Params = dict[str, Any]
Tokens = Sequence[int]
MIN_BUCKET = 16  # shortest padded length


def bucket(n: int, low: int, cap: int) -> int:
    """The padded size for `n`: the next power of two, at least `low`, at most `cap` (few distinct shapes)."""
    return min(max(low, 1 << max(n - 1, 0).bit_length()), cap)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_rows(params: Params, ids: jax.Array, targets: jax.Array, scored: jax.Array, num_steps: jax.Array,
                init_scale: jax.Array, rng: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Per row: (sum of log p(targets) over the `scored` positions, every scored target is the argmax)."""
    b, s = ids.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    state = None  # injection `none` starts from the embedded input (`Huginn.start`), no noise to share
    if cfg.injection != "none":  # one row's draw, shared by every row (each as if scored alone)
        state = jnp.broadcast_to(model.initial_state(rng, (1, s, cfg.n_embd), cfg, init_scale), (b, s, cfg.n_embd))
    logits, _ = model.apply(params, ids, num_steps, state, init_scale, rng, positions, None, cfg)
    target_logits = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    log_probs = target_logits - jax.nn.logsumexp(logits, -1)
    greedy = jnp.argmax(logits, -1) == targets
    return jnp.sum(jnp.where(scored, log_probs, 0.0), -1), jnp.all(greedy | ~scored, -1)


def _row(context: Tokens, continuation: Tokens, block_size: int, i: int) -> tuple[np.ndarray, int]:
    """(input + last target ids, number of scored targets) of one pair; the context is cut from the left
    to fit `block_size` inputs, as lm-eval's HF model does."""
    if len(context) < 1:
        raise ValueError(f"request {i}: empty context; start it with a token (lm-eval uses bos or eos)")
    if not 1 <= len(continuation) <= block_size:
        raise ValueError(f"request {i}: continuation of {len(continuation)} tokens; valid range is "
                         f"1..block_size={block_size}")
    ids = np.concatenate([np.asarray(context, np.int64), np.asarray(continuation, np.int64)])
    return ids[-(block_size + 1):], len(continuation)


def loglikelihoods(params: Params, config: ModelConfig | Config, requests: Sequence[tuple[Tokens, Tokens]], *,
                   num_steps: int, batch_size: int = 8, init_scale: float = 1.0, rng: jax.Array | None = None,
                   progress: Callable[[int], Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(log p(continuation | context) [n] float64, is greedy [n] bool) for the n (context ids, continuation
    ids) pairs of `requests`; is greedy: every continuation token is the argmax after what precedes it.

    `num_steps` recurrences per position; rows run `batch_size` at a time, longest first, each from
    the initial latent `rdlm.forward(..., init_scale=init_scale, rng=rng)` draws for it alone (default
    key 0). Contexts longer than fits `block_size` lose their first tokens. `progress(n)` is called after
    each batch with its number of requests.
    """
    cfg = config.model if isinstance(config, Config) else config
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 0")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    rows = [_row(c, x, cfg.block_size, i) for i, (c, x) in enumerate(requests)]
    for i, (ids, _) in enumerate(rows):
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"request {i} has token ids outside [0, vocab_size={cfg.vocab_size})")
    rng = jax.random.key(0) if rng is None else rng
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    logprobs, greedy = np.zeros(len(rows), np.float64), np.zeros(len(rows), bool)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        length = bucket(len(rows[chunk[0]][0]) - 1, MIN_BUCKET, cfg.block_size)
        n_rows = bucket(len(chunk), 1, batch_size)
        ids = np.zeros((n_rows, length + 1), np.int32)
        scored = np.zeros((n_rows, length), bool)
        for r, i in enumerate(chunk):
            tokens, n_scored = rows[i]
            ids[r, :len(tokens)] = tokens
            scored[r, len(tokens) - 1 - n_scored:len(tokens) - 1] = True
        batch_logprobs, batch_greedy = jax.device_get(_score_rows(
            params, jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:]), jnp.asarray(scored), jnp.int32(num_steps),
            jnp.float32(init_scale), rng, cfg))
        logprobs[chunk], greedy[chunk] = batch_logprobs[:len(chunk)], batch_greedy[:len(chunk)]
        if progress is not None:
            progress(len(chunk))
    return logprobs, greedy


def rolling_windows(tokens: Tokens, prefix_id: int, block_size: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's `loglikelihood_rolling` windows (`get_rolling_token_windows` with context 1, made
    disjoint) as (context, continuation) pairs: every token is predicted once; the first window predicts
    up to `block_size` tokens after `prefix_id`, each later one the next up to `block_size` tokens after as
    much preceding text as fits `block_size` inputs."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(block_size, len(tokens))
    windows = [([prefix_id], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(len(tokens), done + block_size)
        windows.append((tokens[end - block_size - 1:done], tokens[done:end]))
        done = end
    return windows


def rolling_loglikelihood(params: Params, config: ModelConfig | Config, documents: Sequence[Tokens],
                          prefix_id: int, *, num_steps: int, batch_size: int = 8, init_scale: float = 1.0,
                          rng: jax.Array | None = None, progress: Callable[[int], Any] | None = None
                          ) -> np.ndarray:
    """log p(document) [n] for the n token lists of `documents`, conditioned on `prefix_id` (bos or eos): the
    sum over its `rolling_windows`, all documents' windows batched together (`loglikelihoods`; `progress`
    counts windows)."""
    cfg = config.model if isinstance(config, Config) else config
    windows = [rolling_windows(doc, prefix_id, cfg.block_size) for doc in documents]
    logprobs, _ = loglikelihoods(params, cfg, [w for ws in windows for w in ws], num_steps=num_steps,
                                 batch_size=batch_size, init_scale=init_scale, rng=rng, progress=progress)
    ends = np.cumsum([len(ws) for ws in windows], dtype=np.int64)
    return np.asarray([logprobs[end - len(ws):end].sum() for ws, end in zip(windows, ends)], np.float64)
