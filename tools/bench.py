"""Benchmarks. Prints one JSON object per line; never passes or fails.

    python tools/bench.py forward CONFIG [key=value ...] [--batch 8 --seq 32 --steps 4,64]
        forward tokens/s, MFU and compile seconds at each num_steps, all from one jitted function;
        with --official-python/--official-script, also the official PyTorch forward on the same
        weights (exported by rdlm) in the same run, as official_ratio = ours / official.
    python tools/bench.py train CONFIG [key=value ...] [--batch 8 --seq 32 --steps 4,64 --n-fixed N]
        training step (forward + backward with truncated backprop, optimizer update): compile seconds,
        temp bytes from memory_analysis(), tokens/s and MFU (model FLOPs: no-grad steps x1, grad
        steps x3) for each model.mean_recurrence in --steps, with n = mean_recurrence - k and
        k = model.mean_backprop_depth; with --official-*, the official forward+backward tokens/s.
    python tools/bench.py convert CONFIG [key=value ...] [--dtype bfloat16 --shards 4]
        builds a synthetic checkpoint of CONFIG's shapes with the official names (random values,
        several shards), converts it with `python -m rdlm.convert` in a child process and reports
        its wall seconds and peak RSS.

The official script (kept outside this repo) is called as
`PYTHON SCRIPT HF_DIR --batch B --seq S --num-steps N --iters K` and prints {"tokens_per_s": x}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rdlm import model  # noqa: E402
from rdlm.config import load_config  # noqa: E402
from rdlm.hf import INDEX_FILE, write_hf  # noqa: E402
from rdlm.flops import forward_flops_per_token, peak_flops  # noqa: E402
from rdlm.optim import make_optimizer  # noqa: E402
from rdlm.params import (EMBEDDING, ROPE_BUFFER, TIED_HEAD, count_params, init_params, param_specs,  # noqa: E402
                         rope_buffer_shape, spec_at)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def official_tokens_per_s(args, hf_dir: Path, steps: int, extra: list[str] = ()) -> float:
    """Run the official code (scratch script outside the repo) on the weights in `hf_dir`."""
    out = subprocess.run([args.official_python, args.official_script, str(hf_dir), "--batch", str(args.batch),
                          "--seq", str(args.seq), "--num-steps", str(steps), "--iters", str(args.iters), *extra],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def bench_forward(args, cfg, base) -> None:
    params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
    tokens = args.batch * args.seq
    peak, _ = peak_flops()
    model.apply.clear_cache()
    with tempfile.TemporaryDirectory(prefix="rdlm-bench-") as tmp:
        if args.official_script:  # the official code runs on the very same weights, exported by rdlm
            write_hf(params, cfg, Path(tmp) / "hf")
        for steps in args.steps:
            def run(steps=steps):
                return model.forward(params, ids, cfg, num_steps=steps, init_scale=0.0)
            first = _timed(run)
            seconds = float(np.median([_timed(run) for _ in range(args.iters)]))
            record = base | dict(num_steps=steps, batch=args.batch, seq=args.seq,
                                 compile_s=max(first - seconds, 0.0), jit_cache_size=model.apply._cache_size(),
                                 seconds=seconds, tokens_per_s=tokens / seconds, peak_flops=peak,
                                 mfu=forward_flops_per_token(cfg, steps, args.seq) * tokens / seconds / peak)
            if args.official_script:
                official = official_tokens_per_s(args, Path(tmp) / "hf", steps)
                record |= dict(official_tokens_per_s=official, official_ratio=record["tokens_per_s"] / official)
            emit(record)


def bench_train(args, cfg, base) -> None:
    import dataclasses

    from rdlm.config import Config, OptimConfig, TrainConfig
    from rdlm.flops import train_flops_per_token
    from rdlm.train import init_state, make_train_step

    peak, _ = peak_flops()
    ids = np.asarray(jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size), np.int32)
    batch = {"inputs": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones_like(ids),
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), ids.shape).copy(),
             "segment_ids": np.ones_like(ids)}
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory(prefix="rdlm-bench-") as tmp:
        for mean_recurrence in args.steps:
            model_cfg = dataclasses.replace(cfg, mean_recurrence=mean_recurrence)
            config = Config(model=model_cfg, optim=OptimConfig(warmup_steps=1),
                            train=TrainConfig(batch_size=args.batch, seq_len=args.seq))
            optimizer = make_optimizer(config.optim, model_cfg, 1000)
            step = make_train_step(config, optimizer)
            k = model_cfg.mean_backprop_depth
            n = max(mean_recurrence - k, 0)
            state = init_state(config, optimizer)
            start = time.perf_counter()
            compiled = step.lower(state, batch, jnp.int32(n), jnp.int32(k)).compile()
            compile_s = time.perf_counter() - start
            times = []
            for _ in range(args.iters + 1):
                start = time.perf_counter()
                state, metrics = compiled(state, batch, jnp.int32(n), jnp.int32(k))
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - start)
            seconds = float(np.median(times[1:]))
            record = base | dict(mean_recurrence=mean_recurrence, n=n, k=k, batch=args.batch, seq=args.seq,
                                 compile_s=compile_s, temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
                                 seconds=seconds, tokens_per_s=tokens / seconds, peak_flops=peak,
                                 mfu=train_flops_per_token(model_cfg, n, k, args.seq) * tokens / seconds / peak)
            if args.official_script:
                write_hf(state["params"], model_cfg, Path(tmp) / f"hf{mean_recurrence}")
                official = official_tokens_per_s(args, Path(tmp) / f"hf{mean_recurrence}", mean_recurrence,
                                                 ["--train", "--grad-steps", str(k)])
                record |= dict(official_tokens_per_s=official, official_ratio=record["tokens_per_s"] / official)
            emit(record)


def write_synthetic_hf(cfg, dst: Path, dtype: str, shards: int) -> int:
    """An HF directory with CONFIG's official tensor names and shapes, random values, `shards` files."""
    dt = jnp.dtype(dtype)
    specs = [(s.hf_name, s.hf_shape) for s in param_specs(cfg)] + [(ROPE_BUFFER, rope_buffer_shape(cfg))]
    seeds = {name: n for n, (name, _) in enumerate(specs)}
    if cfg.tie_embeddings:  # as in the hub's fp32 checkpoint: a copy of the embedding
        specs.append((TIED_HEAD, (cfg.vocab_size, cfg.n_embd)))
        seeds[TIED_HEAD] = seeds[spec_at(cfg, EMBEDDING).hf_name]
    total = sum(int(np.prod(shape)) * dt.itemsize for _, shape in specs)
    dst.mkdir(parents=True)
    written: list[list[str]] = []  # tensor names of each shard file, in order
    shard, size = {}, 0
    for n, (name, shape) in enumerate(specs):
        rng = np.random.default_rng(seeds[name])
        shard[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dt)
        size += shard[name].nbytes
        if size >= total / shards or n == len(specs) - 1:
            save_file(shard, dst / f"shard-{len(written)}", metadata={"format": "pt"})
            written.append(list(shard))
            shard, size = {}, 0
    weight_map = {}
    for k, names in enumerate(written):
        file = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
        (dst / f"shard-{k}").rename(dst / file)
        weight_map |= dict.fromkeys(names, file)
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(cfg.to_hf_dict(torch_dtype=dt.name)))
    return total


# The converter's own peak: VmHWM of the process after exec. (ru_maxrss of a child would include the
# high-water mark it inherits from this process at fork, which holds the synthetic tensors.)
_CONVERT_AND_REPORT_PEAK = """import sys
from rdlm.convert import main
rc = main(sys.argv[1:])
print(next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM')))
sys.exit(rc)"""


def bench_convert(args, cfg, base) -> None:
    with tempfile.TemporaryDirectory(prefix="rdlm-bench-convert-", dir=args.workdir) as tmp:
        src, dst = Path(tmp) / "hf", Path(tmp) / "rdlm"
        start = time.perf_counter()
        nbytes = write_synthetic_hf(cfg, src, args.dtype, args.shards)
        made = time.perf_counter() - start
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _CONVERT_AND_REPORT_PEAK, str(src), str(dst)], check=True,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peak = int(out.stdout.split()[-1])
        emit(base | dict(dtype=args.dtype, shards=len(list(src.glob("*.safetensors"))), params=count_params(cfg), checkpoint_bytes=nbytes,
                         synth_s=made, seconds=seconds, peak_rss_bytes=peak, peak_rss_gib=peak / 2**30))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["forward", "train", "convert"])
    parser.add_argument("config", help="preset name or YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[4, 64])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--official-python", help="python with torch + transformers for the official code")
    parser.add_argument("--official-script", help="scratch script running the official forward (outside the repo)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="where the synthetic checkpoint is written (default: tmp)")
    args = parser.parse_args(argv)
    if bool(args.official_python) != bool(args.official_script):
        parser.error("--official-python and --official-script go together")
    cfg = load_config(args.config, args.overrides).model
    base = dict(bench=args.bench, config=args.config, overrides=args.overrides, backend=jax.default_backend())
    {"forward": bench_forward, "train": bench_train, "convert": bench_convert}[args.bench](args, cfg, base)


if __name__ == "__main__":
    main()
