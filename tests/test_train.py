"""The training loop: exact resume, preemption, non-finite losses, damaged checkpoints."""

import json
import os
import random
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

import rdlm.train as train_mod
from rdlm.checkpoint import CheckpointError, load_run
from rdlm.config import load_config
from rdlm.train import TrainingError, train

pytestmark = pytest.mark.slow


def config(overrides, *extra):
    return load_config("tiny", [*overrides, "train.eval_every=1000", "train.checkpoint_every=1000", *extra])


def assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


def test_sigterm_at_a_random_step_resumes_bitwise(train_overrides, tmp_path):
    """Preemption (SIGTERM) at a random step saves that step and stops; the resumed run ends with the
    parameters of an uninterrupted one, bit for bit."""
    at = random.Random().randint(1, 7)
    print(f"SIGTERM at step {at}")
    full = train(config(train_overrides, "train.steps=8", f"train.out_dir={tmp_path / 'a'}",
                        "train.grad_accum=2", "train.batch_size=16"))
    cfg = config(train_overrides, "train.steps=8", f"train.out_dir={tmp_path / 'b'}", "train.grad_accum=2", "train.batch_size=16")

    def preempt(step):
        if step == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return False

    first = train(cfg, should_stop=preempt)
    assert first["step"] == at and os.listdir(tmp_path / "b" / "checkpoints") == [str(at)]
    second = train(cfg)
    assert second["start_step"] == at and second["step"] == 8
    assert_bitwise_equal(full["params"], second["params"])
    _, params, step = load_run(tmp_path / "b")
    assert step == 8
    assert_bitwise_equal(params, full["params"])


def test_nonfinite_loss_stops_without_saving(train_overrides, monkeypatch):
    real = train_mod.token_nll
    monkeypatch.setattr(train_mod, "token_nll", lambda *a: (real(*a)[0] * np.nan, real(*a)[1]))
    # no validation split: the jitted eval step would keep the patched loss in its cache for later tests
    cfg = config(train_overrides, "train.steps=4", "train.checkpoint_every=1", "data.val_fraction=0")
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step 1 \(loss=nan"):
        train(cfg)
    assert os.listdir(f"{cfg.train.out_dir}/checkpoints") == []


def test_nonfinite_steps_can_be_skipped(train_overrides, monkeypatch):
    real = train_mod.token_nll
    monkeypatch.setattr(train_mod, "token_nll", lambda *a: (real(*a)[0] * np.nan, real(*a)[1]))
    cfg = config(train_overrides, "train.steps=3", "train.nonfinite=skip", "train.log_every=1", "data.val_fraction=0")
    summary = train(cfg)
    init = train_mod.init_state(cfg, train_mod.make_optimizer(cfg.optim, cfg.model, 3))["params"]
    assert_bitwise_equal(summary["params"], init)  # no update was applied
    rows = [json.loads(line) for line in open(f"{cfg.train.out_dir}/metrics.jsonl")]
    assert [r["skipped"] for r in rows if "skipped" in r] == [1, 1, 1]


def test_damaged_newest_checkpoint_falls_back_to_previous(train_overrides, capsys):
    cfg = config(train_overrides, "train.steps=4", "train.checkpoint_every=2")
    train(cfg)
    damaged = f"{cfg.train.out_dir}/checkpoints/4/state"
    shutil.rmtree(f"{damaged}/d")
    for f in os.listdir(f"{damaged}/ocdbt.process_0/d"):
        os.remove(f"{damaged}/ocdbt.process_0/d/{f}")
    summary = train(config(train_overrides, "train.steps=5", "train.checkpoint_every=2"))
    assert summary["start_step"] == 2
    assert f"checkpoint {cfg.train.out_dir}/checkpoints/4 failed to restore" in capsys.readouterr().out
    assert sorted(os.listdir(f"{cfg.train.out_dir}/checkpoints")) == ["2", "4", "4.unreadable", "5"]


def test_resume_with_other_model_is_refused_but_not_other_attention(train_overrides):
    train(config(train_overrides, "train.steps=1"))
    with pytest.raises(CheckpointError, match=r"different settings: model.n_embd \(32 in the checkpoint, 64 now\); "
                                              r"optim.lr \(0.001 in the checkpoint, 0.5 now\)"):
        train(config(train_overrides, "train.steps=2", "model.n_embd=64", "optim.lr=0.5"))
    # the attention implementation is a compute choice: a resume may change it
    assert train(config(train_overrides, "train.steps=2", "model.attention=chunked"))["start_step"] == 1
    # a run saved with adamw's eps spelled out (as config.yml files before optim.eps could be None) is the same run
    assert train(config(train_overrides, "train.steps=3", "optim.eps=1e-8"))["start_step"] == 2


def test_run_folder_contents(train_overrides):
    cfg = config(train_overrides, "train.steps=4", "train.eval_every=2", "train.log_every=2")
    summary = train(cfg)
    out = cfg.train.out_dir
    assert load_config(f"{out}/config.yml") == cfg
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    evals = [r["eval"] for r in rows if "eval" in r]
    assert len(evals) == 2 and set(evals[0]) == {"1", "4", "8"}
    logs = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4] and all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in logs)
    assert all(0 <= r["k"] <= 4 for r in logs)
    assert set(summary["eval"]) == {1, 4, 8}
    board = tensorboard_scalars(out)
    assert [step for step, _ in board["train/loss"]] == [2, 4]
    assert [v for _, v in board["train/loss"]] == pytest.approx([r["loss"] for r in logs])
    assert [v for _, v in board["val/loss_r8"]] == pytest.approx([e["8"] for e in evals])


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from the TensorBoard event files in `directory` (TFRecord framing: length, its
    CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            length = int.from_bytes(data[at:at + 8], "little")
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _batch(rows, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, seq), dtype=np.int32)
    return {"inputs": ids, "targets": np.roll(ids, -1, 1), "loss_mask": (rng.random((rows, seq)) > 0.1).astype(np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
            "segment_ids": np.ones((rows, seq), np.int32)}


def test_gradient_accumulation_equals_one_large_batch():
    one, two = load_config("tiny"), load_config("tiny", ["train.grad_accum=4"])
    params = train_mod.init_params(one.model, jax.random.key(0))
    batch = _batch(8, 32, one.model.vocab_size)
    loss1, g1, t1 = train_mod.loss_and_grads(params, batch, 0, 0, jax.random.key(1), one)
    loss2, g2, t2 = train_mod.loss_and_grads(params, batch, 0, 0, jax.random.key(1), two)
    assert float(t1) == float(t2) == batch["loss_mask"].sum()
    assert float(loss1) == pytest.approx(float(loss2), rel=2e-2)  # rows see different initial-state noise
    # the token-weighted normalisation: the accumulated loss is the mean over all target tokens
    nll = [train_mod._loss(params, jax.tree.map(lambda x, i=i: x[i::4], batch), 0, 0, jax.random.fold_in(
        jax.random.key(1), i), two) for i in range(4)]
    assert float(loss2) == pytest.approx(sum(float(s) for s, _ in nll) / sum(float(c) for _, c in nll), rel=1e-6)


def test_chunked_loss_equals_the_whole_logits_with_gradients():
    """`train.loss_chunk`: the cross-entropy 7 positions at a time (32 is no multiple: a padded last chunk)
    equals it over the whole logits, gradients included."""
    cfg = load_config("tiny").model
    params = train_mod.init_params(cfg, jax.random.key(0))
    batch = _batch(2, 32, cfg.vocab_size)
    batch["loss_mask"][0, :5] = 0

    def loss(p, chunk):
        m = train_mod.model.merge(p, cfg)
        x = m.train_features(batch["inputs"], batch["positions"], batch["segment_ids"], 1, 2, jax.random.key(1))
        if chunk is None:
            return train_mod.token_nll(m.head(x), batch["targets"], batch["loss_mask"])
        return train_mod.chunked_nll(m.head, x, batch["targets"], batch["loss_mask"], chunk)

    (whole, count), g_whole = jax.value_and_grad(loss, has_aux=True)(params, None)
    (chunked, count7), g_chunked = jax.value_and_grad(loss, has_aux=True)(params, 7)
    assert float(count) == float(count7) == batch["loss_mask"].sum()
    assert float(chunked) == pytest.approx(float(whole), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()) + 1e-12)


def test_bf16_master_weights_keep_their_types(train_overrides):
    config = load_config("tiny", [*train_overrides, "train.param_dtype=bfloat16", "train.grad_accum=2"])
    optimizer = train_mod.make_optimizer(config.optim, config.model, 10)
    state = train_mod.init_state(config, optimizer)
    types = jax.tree.map(lambda x: x.dtype, state)
    step = train_mod.make_train_step(config, optimizer)
    batch = _batch(8, 32, config.model.vocab_size)
    for _ in range(2):
        state, metrics = step(state, batch, 1, 2)
    assert jax.tree.map(lambda x: x.dtype, state) == types
    assert step._cache_size() == 1 and bool(metrics["finite"])
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype("bfloat16")}


def test_batch_that_the_mesh_cannot_split_is_named(train_overrides):
    with pytest.raises(train_mod.ConfigError, match="3 rows per micro-batch must be divisible by the 8 devices"):
        train(load_config("tiny", [*train_overrides, "train.batch_size=6", "train.grad_accum=2"]))
