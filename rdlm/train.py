"""Train a recurrent-depth model: `python -m rdlm.train CONFIG [key=value ...]`.

Each step samples a recurrence depth (n steps without gradient, k with), as the official training
does, from (seed, step): a resumed run replays the same depths. The step is one jitted function of
(state, batch, n, k); n and k are traced, so no depth recompiles. The run folder holds the resolved
`config.yml`, `metrics.jsonl` and `checkpoints/` (train state, data-iterator state, config).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from rdlm import model, recurrence
from rdlm.checkpoint import TrainCheckpointer
from rdlm.config import Config, ConfigError, ModelConfig, dump_config, load_config, to_dict
from rdlm.errors import RdlmError, cli
from rdlm.data import Batch, eval_batches, load_documents, make_dataset, split_documents
from rdlm.flops import peak_flops, train_flops_per_token
from rdlm.optim import lr_schedule, make_optimizer, state_shardings
from rdlm.params import init_params
from rdlm.sharding import (activate, batch_sharding, constrain_params, global_batch, initialize_distributed,
                           make_mesh, shards)
from rdlm.tokenizer import load_tokenizer

State = dict[str, Any]


class TrainingError(RdlmError, RuntimeError):
    """The run cannot go on (non-finite loss, incompatible resume); the message says why."""


# ---- loss and steps -------------------------------------------------------------------------------


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token negative log-likelihoods over masked-in tokens, their count), in fp32."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum((logz - gold) * m), jnp.sum(m)


def chunked_nll(head: Callable[[jax.Array], jax.Array], x: jax.Array, targets: jax.Array, mask: jax.Array,
                chunk: int) -> tuple[jax.Array, jax.Array]:
    """`token_nll` of the logits `head(x)`, `chunk` positions at a time, each chunk rematerialised: the fp32
    `[batch, seq, vocab]` logits and their gradient never exist whole."""
    b, T, _ = x.shape
    C = min(chunk, T)
    Tp = -(-T // C) * C

    def chunks(a: jax.Array) -> jax.Array:  # [b, T, ...] -> [T / C, b, C, ...], padding masked out
        a = jnp.pad(a, [(0, 0), (0, Tp - T)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, Tp // C, C, *a.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def add(total, xs):
        xc, tc, mc = xs
        nll, count = token_nll(head(xc), tc, mc)
        return (total[0] + nll, total[1] + count), None

    total, _ = jax.lax.scan(add, (jnp.float32(0), jnp.float32(0)), (chunks(x), chunks(targets), chunks(mask)))
    return total


def _loss(params, batch: Batch, n, k, rng, config: Config):
    m = model.merge(params, config.model)
    x = m.train_features(batch["inputs"], batch["positions"], batch["segment_ids"], n, k, rng, config.train.remat)
    return chunked_nll(m.head, x, batch["targets"], batch["loss_mask"], config.train.loss_chunk)


def init_state(config: Config, optimizer) -> State:
    params = init_params(config.model, jax.random.key(config.train.seed), jnp.dtype(config.train.param_dtype))
    moments_like = jax.tree.map(lambda p: p.astype(jnp.float32), params)  # Adam moments in fp32 always
    return {"params": params, "opt_state": optimizer.init(moments_like), "step": jnp.int32(0),
            "rng": jax.random.key_data(jax.random.key(config.train.seed))}


def loss_and_grads(params, batch: Batch, n, k, key, config: Config):
    """(mean loss, gradients of the mean, target tokens) over `train.grad_accum` micro-batches: sums of
    token losses and gradients, normalised once by the total number of target tokens."""
    accum = config.train.grad_accum
    # micro-batch i takes rows i, i + accum, ...: each device's rows split evenly, no resharding
    micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
    grad_fn = jax.value_and_grad(_loss, has_aux=True)

    def accumulate(carry, xs):
        grads, loss, tokens = carry
        mb, i = xs
        (l, t), g = grad_fn(params, mb, n, k, jax.random.fold_in(key, i), config)
        return (constrain_params(jax.tree.map(jnp.add, grads, g), config.model), loss + l, tokens + t), None

    zeros = constrain_params(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), config.model)
    (grads, loss, tokens), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (micro, jnp.arange(accum)))
    tokens = jnp.maximum(tokens, 1.0)
    return loss / tokens, jax.tree.map(lambda g: g / tokens, grads), tokens


def make_train_step(config: Config, optimizer, shardings: tuple[Any, Any] | None = None) -> Callable:
    """jitted (state, batch, n, k) -> (state, metrics). A non-finite loss or gradient leaves params and
    optimizer state unchanged. With `shardings` = (state, batch) shardings, jit pins inputs and outputs."""
    schedule = lr_schedule(config.optim, config.train.steps)

    def step(state: State, batch: Batch, n: jax.Array, k: jax.Array):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        loss, grads, tokens = loss_and_grads(state["params"], batch, n, k, key, config)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = {"params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"]),
                     "step": state["step"] + 1, "rng": state["rng"]}
        applied = state["opt_state"][-1].count  # the schedule's own step counter (skipped steps excluded)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(applied), "tokens": tokens,
                   "finite": finite}
        return new_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    state_sh, batch_sh = shardings
    return jax.jit(step, in_shardings=(state_sh, batch_sh, None, None), out_shardings=(state_sh, None),
                   donate_argnums=0)


@functools.partial(jax.jit, static_argnames="cfg")
def eval_step(params, batch: Batch, num_steps: jax.Array, rng: jax.Array, cfg: ModelConfig):
    """(summed nll, tokens) at a fixed recurrence; the initial state is the official random init."""
    logits, _ = model.apply(params, batch["inputs"], num_steps, None, jnp.float32(1.0), rng, batch["positions"],
                            batch["segment_ids"], cfg)
    return token_nll(logits, batch["targets"], batch["loss_mask"])


def evaluate(params, batches: list[Batch], recurrences: tuple, cfg: ModelConfig, seed: int = 0) -> dict[int, float]:
    """Validation loss per recurrence count (token-weighted over `batches`)."""
    out = {}
    for r in recurrences:
        total = count = 0.0
        for i, batch in enumerate(batches):
            s, c = eval_step(params, batch, jnp.int32(r), jax.random.key(seed + i), cfg)
            total, count = total + float(s), count + float(c)
        out[int(r)] = total / max(count, 1.0)
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "scheme"))
def _sample(rng: jax.Array, step: jax.Array, cfg: ModelConfig, scheme: str):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), step), 0x5EED)
    return recurrence.sample_recurrence(key, cfg, scheme, step)


# ---- the loop -------------------------------------------------------------------------------------


class _Log:
    """Progress lines on stdout, JSON lines in `metrics.jsonl` and TensorBoard event files beside it
    (tensorboardX: no TensorFlow), process 0 only."""

    def __init__(self, path: Path, total: int, enabled: bool, tensorboard: bool = True):
        self.total, self.enabled, self.start = total, enabled, time.time()
        self.file = open(path, "a") if enabled else None
        self.board_dir = path.parent if enabled and tensorboard else None
        self.board: SummaryWriter | None = None  # opened at the first scalar: a finished run adds no empty file

    def record(self, **row: Any) -> None:
        """One JSON line; a NaN or inf value (also one of an `eval` dict) is written as null and its key listed
        under `nonfinite`. Rows with a `step` also go to TensorBoard: their numbers as `train/KEY`, an `eval`
        dict as `val/loss_rR`."""
        if not self.enabled:
            return
        finite = lambda v: not isinstance(v, float) or math.isfinite(v)  # noqa: E731
        bad = sorted(k for k, v in row.items() if not finite(v))
        evals = {r: v if finite(v) else None for r, v in row.get("eval", {}).items()}
        bad += [f"eval.{r}" for r, v in evals.items() if v is None]
        row = {k: None if k in bad else v for k, v in row.items()} | ({"eval": evals} if evals else {})
        self.file.write(json.dumps(row | ({"nonfinite": bad} if bad else {})) + "\n")
        self.file.flush()
        if self.board_dir is None or "step" not in row or "event" in row:
            return
        if self.board is None:
            self.board = SummaryWriter(str(self.board_dir), flush_secs=30)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.board.add_scalar(f"train/{key}", value, row["step"])
        for r, loss in evals.items():
            if loss is not None:
                self.board.add_scalar(f"val/loss_r{r}", loss, row["step"])

    def line(self, step: int, text: str) -> None:
        if self.enabled:
            done = step / self.total
            bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
            print(f"[{bar}] {step:>6}/{self.total} | {text} | {time.time() - self.start:6.0f}s", flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.board is not None:
            self.board.close()


def _any_process(flag: bool) -> bool:
    """True on every process if it is true on any (preemption may reach only some hosts)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def _check_batch(config: Config, mesh) -> None:
    """Batch sizes the mesh and the hosts can split evenly; errors name the keys."""
    tc = config.train
    ways = shards(config.mesh.rules, mesh, "batch")
    micro = tc.batch_size // tc.grad_accum
    if tc.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by the {jax.process_count()} processes")
    if micro % ways:
        raise ConfigError(f"train.batch_size / train.grad_accum = {micro} rows per micro-batch must be divisible by "
                          f"the {ways} devices mesh.rules.batch spreads them over")


def _resolved(config: Config) -> Config:
    """`config` with its local paths absolute, so the saved config works from any folder."""
    local = lambda p: p if not p or "://" in p else os.path.abspath(os.path.expanduser(p))  # noqa: E731
    data, tc = config.data, config.train
    return dataclasses.replace(
        config, data=dataclasses.replace(data, tokenizer=local(data.tokenizer), paths=tuple(map(local, data.paths))),
        train=dataclasses.replace(tc, out_dir=local(tc.out_dir), checkpoint_dir=local(tc.checkpoint_dir)))


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold `out/.lock` exclusively for the run: a second run on the same folder would interleave its
    metrics and race on deleting checkpoints. The kernel releases the lock however the process ends."""
    handle = open(out / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise TrainingError(f"train.out_dir={out} is in use by {holder}; two runs cannot share a run folder",
                            hint="wait for that run or stop it, or choose another train.out_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def check_writable(directory: str, need_bytes: int) -> None:
    """Refuse a run folder that cannot take a checkpoint before any step is spent: not creatable, not
    writable, or with less free space than one checkpoint needs (local folders; gs:// is not probed)."""
    if "://" in directory:
        return
    path = Path(directory)
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"rdlm")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"{directory} is not writable ({e.strerror or e}); checkpoints could not be saved",
                            hint="choose a writable train.out_dir / train.checkpoint_dir") from e
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise TrainingError(f"{directory} has {free / 2**30:.2f} GiB free but one checkpoint needs about "
                            f"{need_bytes / 2**30:.2f} GiB", hint="free space or choose another train.out_dir")


def train(config: Config, should_stop: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns a summary. `should_stop(step)` can end the run early with a
    checkpoint, as SIGTERM (preemption) does. Everything that can fail on the user's input (config, mesh,
    tokenizer, data, an incompatible or damaged checkpoint) fails before the run folder is written to."""
    config = _resolved(config)
    config.check_trainable()
    initialize_distributed(config.mesh)
    check_writable(config.train.out_dir, 0)
    if jax.process_index() == 0:
        with run_lock(Path(config.train.out_dir)):
            return _train(config, should_stop)
    return _train(config, should_stop)


def _train(config: Config, should_stop: Callable[[int], bool] | None) -> dict[str, Any]:
    tc, cfg, rules = config.train, config.model, config.mesh.rules
    out = Path(tc.out_dir)
    lead = jax.process_index() == 0
    mesh = make_mesh(config.mesh)
    _check_batch(config, mesh)
    optimizer = make_optimizer(config.optim, cfg, tc.steps)
    new_state = lambda: init_state(config, optimizer)  # noqa: E731
    abstract_state = jax.eval_shape(new_state)
    checkpoint_dir = tc.checkpoint_dir or str(out / "checkpoints")
    check_writable(checkpoint_dir, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)))
    state_sh = state_shardings(abstract_state, optimizer, cfg, rules, mesh)
    batch_sh = batch_sharding(rules, mesh)
    step_fn = make_train_step(config, optimizer, (state_sh, batch_sh))

    tokenizer = load_tokenizer(None, fallback=config.data.tokenizer, model_vocab_size=cfg.vocab_size)
    train_docs, val_docs = split_documents(load_documents(config.data), config.data.val_fraction)
    host_batch = tc.batch_size // jax.process_count()
    common = dict(tokenizer=tokenizer, cfg=config.data, seq_len=tc.seq_len, process_index=jax.process_index(),
                  process_count=jax.process_count())
    train_iter = iter(make_dataset(train_docs, per_host_batch=host_batch, train=True, **common))
    val_set = [global_batch(b, batch_sh) for b in eval_batches(
        make_dataset(val_docs, per_host_batch=host_batch, train=False, **common), tc.eval_batches,
        rows=host_batch, seq_len=tc.seq_len)] if val_docs else []

    state = jax.jit(new_state, out_shardings=state_sh)()  # created sharded: never whole on one device
    checkpointer = TrainCheckpointer(checkpoint_dir, tc.keep_checkpoints, tc.async_checkpoint)
    try:
        restored = checkpointer.restore_latest(state, train_iter, config, tc.restart_from_scratch)
    except BaseException:
        checkpointer.close()
        raise
    if restored:
        step0, state = restored
        skipped = checkpointer.incomplete()
        print(f"resumed from {checkpointer.directory / str(step0)}"
              + (f" (ignored unfinished saves: {', '.join(skipped)})" if skipped else ""), flush=True)
    step = int(state["step"])
    if step > tc.steps:
        checkpointer.close()
        raise TrainingError(f"the checkpoint in {checkpointer.directory} is at step {step}, past train.steps="
                            f"{tc.steps}", hint=f"set train.steps above {step} to continue, or use a new train.out_dir")
    if step == tc.steps:
        print(f"nothing to do: the run is complete at step {step} = train.steps (raise train.steps to continue)",
              flush=True)
    if lead:
        dump_config(config, out / "config.yml")

    preempted = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    peak, peak_source = peak_flops()
    log = _Log(out / "metrics.jsonl", tc.steps, lead, tc.tensorboard)
    log.record(event="start", step=step, peak_flops=peak, peak_source=peak_source, config=to_dict(config))
    window = {"flops": 0.0, "tokens": 0, "time": time.time(), "skipped": 0}
    summary: dict[str, Any] = {"start_step": step, "skipped": 0}
    nonfinite_run = 0  # consecutive skipped steps
    try:
        with activate(mesh, rules):  # activations are pinned to the rules while tracing
            while step < tc.steps:
                batch = global_batch(next(train_iter), batch_sh)
                n, k = (int(x) for x in _sample(state["rng"], jnp.int32(step), cfg, tc.recurrence))
                state, metrics = step_fn(state, batch, jnp.int32(n), jnp.int32(k))
                step += 1
                if step == summary["start_step"] + 1:  # the first step compiles: keep it out of throughput
                    jax.block_until_ready(state)
                    log.record(event="compiled", step=step, compile_s=time.time() - window["time"])
                    window["time"] = time.time()
                else:
                    row_tokens = tc.batch_size * tc.seq_len
                    window["flops"] += train_flops_per_token(cfg, n, k, tc.seq_len) * row_tokens
                    window["tokens"] += row_tokens
                if not bool(metrics["finite"]):
                    if tc.nonfinite == "stop":
                        checkpointer.wait()
                        raise TrainingError(
                            f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, "
                            f"grad_norm={float(metrics['grad_norm'])}, depth n={n} k={k}); nothing was saved for this "
                            f"step; last checkpoints: {sorted(checkpointer.manager.all_steps())} in "
                            f"{checkpointer.directory} (train.nonfinite=skip skips such steps instead)")
                    window["skipped"] += 1
                    summary["skipped"] += 1
                    nonfinite_run += 1
                else:
                    nonfinite_run = 0
                if step % tc.log_every == 0 or step == tc.steps or nonfinite_run >= tc.max_nonfinite_steps:
                    elapsed = time.time() - window["time"]
                    row = {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                           "lr": float(metrics["lr"]), "n": n, "k": k, "tokens_per_s": window["tokens"] / elapsed,
                           "mfu": window["flops"] / elapsed / peak, "skipped": window["skipped"]}
                    log.record(**row)
                    log.line(step, f"loss {row['loss']:.4f} | depth {n}+{k} | {row['tokens_per_s']:,.0f} tok/s | "
                                   f"MFU {100 * row['mfu']:.1f}% | lr {row['lr']:.2e}"
                                   + (f" | skipped {row['skipped']} non-finite" if row["skipped"] else ""))
                    window = {"flops": 0.0, "tokens": 0, "time": time.time(), "skipped": 0}
                    summary["loss"] = row["loss"]
                if nonfinite_run >= tc.max_nonfinite_steps:
                    checkpointer.save(step, state, train_iter, to_dict(config))
                    checkpointer.wait()
                    raise TrainingError(
                        f"{nonfinite_run} consecutive steps up to step {step} had a non-finite loss or gradient and "
                        f"were skipped (train.max_nonfinite_steps={tc.max_nonfinite_steps}); the unchanged parameters "
                        f"were saved at step {step} in {checkpointer.directory}",
                        hint="lower optim.lr, check the data, or raise train.max_nonfinite_steps")
                if val_set and (step % tc.eval_every == 0 or step == tc.steps):
                    losses = evaluate(state["params"], val_set, tc.eval_recurrence, cfg)
                    log.record(step=step, eval=losses)
                    log.line(step, "val " + "  ".join(f"r={r}: {v:.3f}" for r, v in losses.items()))
                    summary["eval"] = losses
                stop = _any_process((should_stop is not None and should_stop(step)) or bool(preempted))
                if step % tc.checkpoint_every == 0 or step == tc.steps or stop:
                    checkpointer.save(step, state, train_iter, to_dict(config))
                if stop:
                    print(f"stopping at step {step} (preemption); checkpoint saved in {checkpointer.directory}", flush=True)
                    break
    finally:
        checkpointer.wait()
        checkpointer.close()
        log.close()
        signal.signal(signal.SIGTERM, previous_handler)
        if hasattr(train_iter, "close"):
            train_iter.close()
    summary.update(step=step, params=state["params"])
    return summary


@cli
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    train(load_config(argv[0], argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
