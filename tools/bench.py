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
    python tools/bench.py decode CONFIG [key=value ...] [--seq 32 --new 32 --steps 8 --batches 1,8 --checkpoint DIR
                                                         --criteria entropy-diff,kl]
        cached generation (rdlm.generate), greedy, best of --iters: prefill tokens/s (prompt of --seq tokens),
        decode tokens/s (the --new - 1 tokens after the first) and the peak RSS so far at each batch size
        and num_steps; then (unless --criteria ""), at
        batch 1, the mean recurrence steps per token and decode tokens/s under each exit criterion
        (official default thresholds), and the KV-cache bytes of each cache strategy. Weights: random,
        or --checkpoint (rdlm checkpoint, training run or HF directory) for meaningful exit figures;
        --cache-only prints just the cache bytes (any config, nothing is run). With --official-*,
        the official `generate` on the same weights, same prompt shape: official_ratio = ours / official.
    python tools/bench.py memory CONFIG [key=value ...] --devices 8 [--batch 8 --seq 4096 --specs FILE]
    python tools/bench.py memory CONFIG [key=value ...] --topology v5e:2x4 [--batch 8 --seq 4096 --prefill STEPS]
        memory per device of a training step: the analytic parameter + optimizer bytes from the
        sharding specs, and the compiled step's memory_analysis() (arguments, outputs, temporaries, and
        the compiler's peak as peak_bytes_per_device: on TPU, arguments + temporaries over-count it),
        compiled for --devices virtual CPU devices, or ahead of time for a TPU topology when libtpu is
        installed (reported as skipped otherwise); --specs writes every parameter's spec. With
        --prefill STEPS, the generation program instead: a --seq-token prompt per row prefilled at
        STEPS recurrences, then one decoded token.
    python tools/bench.py convert CONFIG [key=value ...] [--dtype bfloat16 --shards 4 --keep DIR]
        builds a synthetic checkpoint of CONFIG's shapes with the official names (random values,
        several shards), converts it with `python -m rdlm.convert` in a child process and reports
        its wall seconds and peak RSS; --keep DIR keeps the converted checkpoint (for decode
        --checkpoint DIR, whose records carry the process's peak RSS).

    python tools/bench.py flops CONFIG [key=value ...] [--seq 4096 --batch 8 --mfu 0.4]
        MFU on paper: model FLOPs per token of the training step at n = mean_recurrence - k no-grad
        steps (x1) and k = mean_backprop_depth grad steps (x3), and for each chip in the vendor table its
        bf16 peak, the tokens/s per chip at --mfu and the seconds per step of --batch x --seq tokens per
        chip. Nothing is compiled or run.
    python tools/bench.py serve CONFIG [key=value ...] [--clients 1,4,16,64 --requests N --new 16 --steps 4,8
                                                        --slots 16 --timeout 600 --server-flags "..."]
        continuous batching against sequential generation, on random weights saved as an rdlm checkpoint:
        a fixed mix of greedy requests (prompts of 4..block_size/2 tokens, depths cycled from --steps)
        through `rdlm.generate` one at a time (compiled first), then through `python -m rdlm.serve` (a
        child process on a free loopback port) from each number of --clients at once, each sending its next
        request when its answer arrives: tokens/s, p50/p99 latency, answered / rejected (429) / failed
        counts, greedy mismatches against `rdlm.generate` and speedup_vs_sequential per level. The whole
        run stops sending after --timeout seconds (timed_out in the records). A "batched" record times
        the same mix through `rdlm.generate` calls of --slots prompts of one depth each: static batching
        with every request known in advance, the most batching buys on this machine (each level's
        fraction_of_batched is its throughput against it). The server runs with `--chunk 32
        --attention-block 32`; --server-flags adds flags of its own (later ones win).

The official script (kept outside this repo) is called as
`PYTHON SCRIPT HF_DIR --batch B --seq S --num-steps N --iters K` and prints {"tokens_per_s": x};
with `--generate NEW` it times the official greedy generate and prints
{"prefill_tokens_per_s": x, "decode_tokens_per_s": y}.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count="


def virtual_devices(argv: list[str]) -> int | None:
    """The value of `--devices N` or `--devices=N` (the last one) when it is a positive integer; anything
    else is left to argparse, which names the flag and the valid range."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--devices":
            value = argv[i + 1] if i + 1 < len(argv) else None
        elif arg.startswith("--devices="):
            value = arg.partition("=")[2]
    return int(value) if value and value.isdecimal() and int(value) > 0 else None


if _devices := virtual_devices(sys.argv[1:]):  # virtual CPU devices for `memory`: set before jax is imported
    os.environ["XLA_FLAGS"] = " ".join([f for f in os.environ.get("XLA_FLAGS", "").split()
                                        if not f.startswith(DEVICE_COUNT_FLAG)] + [f"{DEVICE_COUNT_FLAG}{_devices}"])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rdlm import model  # noqa: E402
from rdlm.config import ConfigError, load_config  # noqa: E402
from rdlm.errors import ArgumentParser, cli  # noqa: E402
from rdlm.hf import INDEX_FILE, write_hf  # noqa: E402
from rdlm.flops import forward_flops_per_token, peak_flops  # noqa: E402
from rdlm.optim import make_optimizer, state_shardings  # noqa: E402
from rdlm.params import (EMBEDDING, ROPE_BUFFER, TIED_HEAD, count_params, init_params, param_specs,  # noqa: E402
                         rope_buffer_shape, spec_at)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def official_run(args, hf_dir: Path, steps: int, extra: list[str] = (), batch: int | None = None) -> dict:
    """Run the official code (scratch script outside the repo) on the weights in `hf_dir`."""
    out = subprocess.run([args.official_python, args.official_script, str(hf_dir), "--batch", str(batch or args.batch),
                          "--seq", str(args.seq), "--num-steps", str(steps), "--iters", str(args.iters), *extra],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def official_tokens_per_s(args, hf_dir: Path, steps: int, extra: list[str] = ()) -> float:
    return official_run(args, hf_dir, steps, extra)["tokens_per_s"]


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


def peak_rss() -> int:
    """This process's peak resident bytes so far: what host memory a CPU run needed (Linux counts KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_decode(args, cfg, base) -> None:
    from rdlm.inference import CRITERIA, STRATEGIES, cache_bytes, generate, load_checkpoint

    unknown = [c for c in args.criteria or () if c not in CRITERIA]
    if unknown:
        raise ConfigError(f"--criteria: unknown {', '.join(unknown)}; valid: {', '.join(CRITERIA)}")
    params = None
    if args.checkpoint and not args.cache_only:  # the checkpoint's own shapes; overrides may change compute only
        config, params = load_checkpoint(args.checkpoint, base["overrides"])
        cfg = config.model
    length = args.seq + args.new
    for strategy in [s.replace("<n>", str(cfg.n_layers_in_recurrent_block)) for s in STRATEGIES]:
        for steps in args.steps:
            emit(base | dict(kind="cache", strategy=strategy, num_steps=steps, batch=1, length=length,
                             dtype=cfg.dtype, cache_bytes=cache_bytes(cfg, 1, length, steps, strategy)))
    if args.cache_only:
        return
    params = init_params(cfg, jax.random.key(0)) if params is None else params
    prompts = np.asarray(jax.random.randint(jax.random.key(1), (max(args.batches), args.seq), 0, cfg.vocab_size))

    def seconds(batch: int, new: int, steps: int, **kw) -> tuple[float, object]:
        def run():
            return generate(params, prompts[:batch], cfg, max_new_tokens=new, num_steps=steps, init_scale=0.0, **kw)
        out = run()  # compile
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - start)
        return min(times), out  # best of --iters: the least disturbed run on a shared machine

    with tempfile.TemporaryDirectory(prefix="rdlm-bench-") as tmp:
        if args.official_script:
            write_hf(params, cfg, Path(tmp) / "hf")
        for steps in args.steps:
            for batch in args.batches:
                prefill, _ = seconds(batch, 1, steps)
                total, _ = seconds(batch, args.new, steps)
                record = base | dict(kind="generate", num_steps=steps, batch=batch, prompt=args.seq, new=args.new,
                                     prefill_tokens_per_s=batch * args.seq / prefill,
                                     decode_tokens_per_s=batch * (args.new - 1) / (total - prefill),
                                     peak_rss_gib=peak_rss() / 2**30)
                if args.official_script:
                    theirs = official_run(args, Path(tmp) / "hf", steps, ["--generate", str(args.new)], batch)
                    record |= dict(official_prefill_tokens_per_s=theirs["prefill_tokens_per_s"],
                                   official_decode_tokens_per_s=theirs["decode_tokens_per_s"],
                                   official_ratio=record["decode_tokens_per_s"] / theirs["decode_tokens_per_s"])
                emit(record)
            if args.criteria == []:  # --criteria "": no exit figures
                continue
            prefill, _ = seconds(1, 1, steps)
            for criterion in args.criteria or CRITERIA:
                total, out = seconds(1, args.new, steps, exit_criterion=criterion)
                emit(base | dict(kind="exit", criterion=criterion, threshold=CRITERIA[criterion].default,
                                 num_steps=steps, batch=1, prompt=args.seq, new=args.new,
                                 mean_steps_per_token=float(out.steps[0, 1:].mean()),
                                 decode_tokens_per_s=(args.new - 1) / (total - prefill)))


def bench_train(args, cfg, base) -> None:
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


def topology_devices(name: str) -> list:
    """The devices of a TPU topology (e.g. v5e:2x4), for ahead-of-time compilation without the chips."""
    import importlib.util

    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError("libtpu is not installed (pip install 'jax[tpu]' where PyPI has it)")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata server here
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)


def bench_memory(args, cfg, base, config) -> None:
    from rdlm.sharding import activate, batch_sharding, describe, make_mesh
    from rdlm.train import init_state, make_train_step

    if args.topology:
        try:
            devices = topology_devices(args.topology)
        except Exception as e:  # noqa: BLE001 (any failure to get a TPU topology means: skip)
            emit(base | dict(topology=args.topology, skipped=f"{type(e).__name__}: {str(e)[:300]}"))
            return
    else:
        devices = jax.devices()
        if args.devices and len(devices) != args.devices:  # e.g. a GPU backend: the flag makes CPU devices only
            raise ConfigError(f"--devices {args.devices}: jax runs on {len(devices)} {jax.default_backend()} "
                              "device(s); virtual devices are CPU ones, made when bench.py starts (JAX_PLATFORMS=cpu)")
    report = describe(cfg, config.mesh, len(devices))
    if args.specs:
        Path(args.specs).write_text(json.dumps(report, indent=1) + "\n")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=args.batch,
                                                                     seq_len=args.seq))
    mesh = make_mesh(config.mesh, devices)
    optimizer = make_optimizer(config.optim, cfg, 1000)
    abstract = jax.eval_shape(lambda: init_state(config, optimizer))
    state_sh = state_shardings(abstract, optimizer, cfg, config.mesh.rules, mesh)
    batch_sh = batch_sharding(config.mesh.rules, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh)
    row = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32, sharding=batch_sh)
    batch = {k: row for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids")}
    start = time.perf_counter()
    record = base | dict(devices=len(devices), device_kind=devices[0].device_kind, topology=args.topology,
                         mesh=report["mesh"], batch=args.batch, seq=args.seq,
                         params_per_device=report["params_per_device"])
    if args.prefill:
        record |= dict(program="generate", num_steps=args.prefill, new=2)
    else:  # parameters, Adam's two moments and the gradients, all in the master dtype
        record |= dict(state_bytes_per_device=4 * jnp.dtype(config.train.param_dtype).itemsize
                       * report["params_per_device"])
    try:
        with activate(mesh, config.mesh.rules):
            if args.prefill:
                compiled = generation_program(cfg, state["params"], row, args.prefill, mesh, config.mesh.rules)
            else:
                compiled = make_train_step(config, optimizer, (state_sh, batch_sh)).lower(
                    state, batch, jnp.int32(0), jnp.int32(0)).compile()
    except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED: the step does not fit the chip
        emit(record | dict(fits=False, error=str(e)[:400]))
        return
    mem = compiled.memory_analysis()
    emit(record | dict(fits=True, compile_s=time.perf_counter() - start,
                     argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                     temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                     peak_bytes_per_device=mem.peak_memory_in_bytes))


def bench_flops(args, cfg, base) -> None:
    from rdlm.flops import CHIP_PEAK_FLOPS, train_flops_per_token

    k = cfg.mean_backprop_depth
    n = max(cfg.mean_recurrence - k, 0)
    per_token = train_flops_per_token(cfg, n, k, args.seq)
    for chip, peak in CHIP_PEAK_FLOPS.items():
        tokens_per_s = args.mfu * peak / per_token
        emit(base | dict(chip=chip, n=n, k=k, seq=args.seq, train_flops_per_token=per_token, bf16_peak_flops=peak,
                         mfu=args.mfu, tokens_per_s_per_chip=tokens_per_s,
                         step_s=args.batch * args.seq / tokens_per_s))


def generation_program(cfg, params, prompt, num_steps: int, mesh, rules):
    """`rdlm.generate`'s compiled program for `prompt`-shaped prompts: the prefill at `num_steps` recurrences
    (full cache), then one decoded token; parameters in the compute dtype, sharded as the trainer's."""
    from rdlm.inference import engine
    from rdlm.inference.sampling import Sampling

    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, cfg.dtype, sharding=p.sharding), params)
    spec = engine.Spec(num_steps=num_steps, max_new_tokens=2)
    knobs = engine.Knobs(jnp.float32(0), jnp.float32(0), jnp.float32(1),
                         Sampling(jnp.float32(1), jnp.int32(0), jnp.float32(1), jnp.float32(0)))
    lengths = jax.ShapeDtypeStruct(prompt.shape[:1], jnp.int32)
    return engine.decode.lower(params, prompt, lengths, jnp.zeros((8,), jnp.int32), jax.random.key(0), knobs,
                               cfg=cfg, spec=spec, T=prompt.shape[1] + 2, mesh=(mesh, rules)).compile()


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
    if args.keep and Path(args.keep).exists():
        raise ConfigError(f"--keep {args.keep}: already exists; give a new directory for the converted checkpoint")
    with tempfile.TemporaryDirectory(prefix="rdlm-bench-convert-", dir=args.workdir) as tmp:
        src, dst = Path(tmp) / "hf", Path(args.keep).resolve() if args.keep else Path(tmp) / "rdlm"
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


def save_random_checkpoint(config, path: Path) -> None:
    """Random weights (`init_params`, key 0) of `config` as an rdlm model checkpoint at `path`."""
    from rdlm.checkpoint import save_model

    save_model(path, config, init_params(config.model, jax.random.key(0)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(conn: http.client.HTTPConnection, body: dict) -> tuple[int, dict]:
    """One JSON POST to /v1/completions on a kept-alive connection: (status, answer)."""
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def start_server(ckpt: Path, port: int, args, log: Path, deadline: float) -> subprocess.Popen:
    """`python -m rdlm.serve` on 127.0.0.1:port, once /health answers 200 (its log names any failure)."""
    steps = max(args.steps)
    proc = subprocess.Popen([sys.executable, "-m", "rdlm.serve", "--checkpoint", str(ckpt), "--no-tokenizer",
                             "--port", str(port), "--slots", str(args.slots), "--num-steps", str(steps),
                             "--max-steps", str(steps), "--max-queue", str(max(64, max(args.clients))),
                             "--chunk", "32", "--attention-block", "32",  # CPU: short blocks, little padding
                             "--log-level", "warning", *shlex.split(args.server_flags)],  # later flags win
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not start (exit code {proc.poll()}); its log:\n{log.read_text()[-3000:]}")


def percentiles(latencies: list[float]) -> dict:
    return dict(p50_s=float(np.percentile(latencies, 50)) if latencies else None,
                p99_s=float(np.percentile(latencies, 99)) if latencies else None)


def bench_serve(args, cfg, base, config) -> None:
    """Sequential `rdlm.generate` over a fixed request mix, then the same mix from concurrent HTTP clients."""
    from rdlm.inference import generate

    deadline = time.monotonic() + args.timeout
    longest = min(cfg.block_size // 2, cfg.block_size - args.new)
    rng = np.random.default_rng(0)
    mix = [(rng.integers(0, cfg.vocab_size, int(rng.integers(4, longest + 1))).tolist(), args.steps[i % len(args.steps)])
           for i in range(min(args.requests or 32, 32))]  # (prompt, num_steps); request i sends mix[i % len(mix)]
    params = init_params(cfg, jax.random.key(0))

    def run(prompt: list[int], steps: int) -> list[int]:
        return generate(params, [prompt], cfg, max_new_tokens=args.new, num_steps=steps).tokens[0].tolist()

    expected = [run(*m) for m in mix]  # also compiles every (prompt bucket, depth)
    latencies = []
    for m in mix:
        start = time.perf_counter()
        run(*m)
        latencies.append(time.perf_counter() - start)
    tokens = sum(len(t) for t in expected)
    sequential = tokens / sum(latencies)
    emit(base | dict(kind="sequential", requests=len(mix), new=args.new, num_steps=args.steps, tokens=tokens,
                     seconds=sum(latencies), tokens_per_s=sequential) | percentiles(latencies))

    def batched() -> int:  # static batching at its best: --slots prompts of one depth per call; tokens made
        made = 0
        for steps in sorted(set(args.steps)):
            same = [prompt for prompt, s in mix if s == steps]
            for i in range(0, len(same), args.slots):
                out = generate(params, same[i:i + args.slots], cfg, max_new_tokens=args.new, num_steps=steps)
                made += int(out.lengths.sum())
        return made

    batched()  # compiles
    start = time.perf_counter()
    batched_tokens = batched()
    ceiling = batched_tokens / (time.perf_counter() - start)
    emit(base | dict(kind="batched", requests=len(mix), new=args.new, num_steps=args.steps, batch=args.slots,
                     tokens=batched_tokens, tokens_per_s=ceiling, speedup_vs_sequential=ceiling / sequential))
    with tempfile.TemporaryDirectory(prefix="rdlm-bench-") as tmp:
        save_random_checkpoint(config, Path(tmp) / "ckpt")
        port = free_port()
        server = start_server(Path(tmp) / "ckpt", port, args, Path(tmp) / "server.log", deadline)
        try:
            levels = [serve_level(args, port, clients, mix, expected, deadline) for clients in args.clients]
        finally:
            server.kill()
            server.wait()
    for level in levels:
        emit(base | level | dict(new=args.new, num_steps=args.steps, slots=args.slots,
                                 speedup_vs_sequential=level["tokens_per_s"] / sequential,
                                 fraction_of_batched=level["tokens_per_s"] / ceiling))
    lost = [level["clients"] for level in levels if level["answered"] + level["rejected"] != level["sent"]]
    if lost:
        raise RuntimeError(f"requests neither answered nor rejected (429) with {lost} clients")


def serve_level(args, port: int, clients: int, mix: list, expected: list[list[int]], deadline: float) -> dict:
    """`clients` threads, each sending its next request when the last one is answered, until `--requests`
    (default max(2 x clients, 32)) are sent or the deadline passes."""
    total = args.requests or max(2 * clients, 32)
    results: list[tuple[int, float, int, bool]] = []  # (status, latency, tokens, matches the sequential tokens)
    lock = threading.Lock()
    next_index = iter(range(total))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=max(deadline - time.monotonic(), 1) + 60)
        while time.monotonic() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            prompt, steps = mix[i % len(mix)]
            start = time.perf_counter()
            try:
                status, answer = post(conn, dict(prompt=prompt, max_tokens=args.new, temperature=0, num_steps=steps))
            except (OSError, http.client.HTTPException, ValueError):
                status, answer = -1, {}
                conn.close()
            ids = answer["choices"][0]["token_ids"] if status == 200 else []
            with lock:
                results.append((status, time.perf_counter() - start, len(ids), ids == expected[i % len(mix)]))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    answered = [r for r in results if r[0] == 200]
    tokens = sum(r[2] for r in answered)
    return dict(kind="serve", clients=clients, sent=len(results), answered=len(answered),
                rejected=sum(r[0] == 429 for r in results), failed=sum(r[0] not in (200, 429) for r in results),
                mismatches=sum(not r[3] for r in answered), timed_out=len(results) < total, tokens=tokens,
                seconds=seconds, tokens_per_s=tokens / seconds) | percentiles([r[1] for r in answered])


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {low}")
        return value
    return parse


def list_of(item: Callable[[str], int]) -> Callable[[str], list[int]]:
    """argparse type: a comma-separated list of `item`s."""
    def parse(text: str) -> list[int]:
        return [item(x) for x in text.split(",")]
    return parse


def directory(text: str) -> str:
    """argparse type: an existing directory."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing directory")
    return text


@cli
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     allow_abbrev=False)  # --dev 8 would escape the --devices read before jax starts
    parser.add_argument("bench", choices=["forward", "train", "memory", "convert", "decode", "flops", "serve"])
    parser.add_argument("config", help="preset name or YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    parser.add_argument("--batch", type=at_least(1), default=8)
    parser.add_argument("--seq", type=at_least(1), default=32)
    parser.add_argument("--steps", type=list_of(at_least(1)), default=[4, 64])
    parser.add_argument("--iters", type=at_least(1), default=5)
    parser.add_argument("--new", type=at_least(2), default=32, help="decode: new tokens per prompt")
    parser.add_argument("--batches", type=list_of(at_least(1)), default=[1, 8], help="decode: batch sizes")
    parser.add_argument("--checkpoint", default=None, help="decode: weights to load instead of random ones")
    parser.add_argument("--cache-only", action="store_true", help="decode: only the cache bytes per strategy")
    parser.add_argument("--criteria", type=lambda s: [c for c in s.split(",") if c], default=None,
                        help="decode: exit criteria to report (default: all; \"\": none)")
    parser.add_argument("--clients", type=list_of(at_least(1)), default=[1, 4, 16, 64],
                        help="serve: concurrent clients per level")
    parser.add_argument("--requests", type=at_least(1), default=None,
                        help="serve: requests per level (default: max(2 x clients, 32))")
    parser.add_argument("--slots", type=at_least(1), default=16, help="serve: the server's --slots")
    parser.add_argument("--timeout", type=float, default=600.0, help="serve: seconds for the whole run")
    parser.add_argument("--server-flags", default="",
                        help="serve: more `python -m rdlm.serve` flags, e.g. \"--chunk 16 --tokens-per-step 8\"")
    parser.add_argument("--official-python", help="python with torch + transformers for the official code")
    parser.add_argument("--official-script", help="scratch script running the official forward (outside the repo)")
    parser.add_argument("--mfu", type=float, default=0.4, help="flops: the model FLOPs utilisation to read off")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--shards", type=at_least(1), default=4)
    parser.add_argument("--keep", default=None, help="convert: write the converted checkpoint here and keep it")
    parser.add_argument("--workdir", type=directory, default=None,
                        help="where the synthetic checkpoint is written (default: tmp)")
    parser.add_argument("--devices", type=at_least(1), default=None,
                        help="memory: virtual CPU devices (read before jax starts)")
    parser.add_argument("--specs", default=None, help="memory: write every parameter's sharding spec (JSON) here")
    parser.add_argument("--prefill", type=at_least(1), default=None, metavar="STEPS",
                        help="memory: the generation program (prefill of --seq tokens at STEPS recurrences, one "
                             "decoded token) instead of the train step")
    parser.add_argument("--topology", default=None,
                        help="memory: compile ahead of time for this TPU topology (e.g. v5e:2x4; needs libtpu)")
    args = parser.parse_intermixed_args(argv)
    if bool(args.official_python) != bool(args.official_script):
        parser.error("--official-python and --official-script go together")
    config = load_config(args.config, args.overrides)
    cfg = config.model
    longest = {"decode": args.seq + args.new, "serve": 4 + args.new}.get(args.bench, args.seq)
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu}: a fraction of the peak, in (0, 1]")
    if args.bench != "convert" and longest > cfg.block_size:
        what = {"decode": f"--seq {args.seq} + --new {args.new} = {longest}",
                "serve": f"4 prompt tokens + --new {args.new}"}.get(args.bench, f"--seq {args.seq}")
        raise ConfigError(f"{what} exceeds model.block_size={cfg.block_size}, the longest sequence the model takes")
    base = dict(bench=args.bench, config=args.config, overrides=args.overrides, backend=jax.default_backend())
    if args.bench in ("memory", "serve"):
        {"memory": bench_memory, "serve": bench_serve}[args.bench](args, cfg, base, config)
    else:
        {"forward": bench_forward, "train": bench_train, "convert": bench_convert, "decode": bench_decode,
         "flops": bench_flops}[args.bench](args, cfg, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
