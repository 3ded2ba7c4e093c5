"""Model FLOPs of Huginn and peak FLOP/s of the device, for throughput and MFU figures.

Convention (PaLM, MaxText): 2 FLOPs per multiply-add of every matmul, attention counted without the
causal discount. A forward pass at recurrence r runs the prelude and coda once and the adapter and
core block r times.

The peak of a CPU is measured, and a measurement on a loaded machine is low (MFU figures above 100%),
so the best figure ever measured on a host (name, device kind, cores) is kept in
`${XDG_CACHE_HOME:-~/.cache}/rdlm/peak_flops.json` and used when higher; `RDLM_PEAK_FLOPS=x` sets the
peak FLOP/s of the run outright, on any device.
"""

import json
import os
import socket
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from rdlm.config import ConfigError, ModelConfig

PEAK_ENV = "RDLM_PEAK_FLOPS"


def block_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """One SandwichBlock: qkv, output projection, gated MLP, and the two attention matmuls."""
    e, i = cfg.n_embd, cfg.intermediate_size
    return 2 * (3 * e * e + e * e + 2 * e * i + i * e) + 4 * seq * e


def forward_flops_per_token(cfg: ModelConfig, num_steps: int, seq: int) -> float:
    """Forward FLOPs per token at `num_steps` recurrences (embedding lookup is free)."""
    fixed = (cfg.n_layers_in_prelude + cfg.n_layers_in_coda) * block_flops_per_token(cfg, seq)
    step = cfg.n_layers_in_recurrent_block * block_flops_per_token(cfg, seq) + 2 * 2 * cfg.n_embd * cfg.n_embd
    return fixed + num_steps * step + 2 * cfg.n_embd * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, n: int, k: int, seq: int) -> float:
    """Training FLOPs per token of one step: forward + backward (x3) for everything with gradient,
    forward only (x1) for the n recurrences without gradient. Rematerialisation is not counted."""
    fixed = (cfg.n_layers_in_prelude + cfg.n_layers_in_coda) * block_flops_per_token(cfg, seq) \
        + 2 * cfg.n_embd * cfg.vocab_size
    step = cfg.n_layers_in_recurrent_block * block_flops_per_token(cfg, seq) + 2 * 2 * cfg.n_embd * cfg.n_embd
    return 3 * fixed + n * step + 3 * k * step


# Dense bf16 peak FLOP/s per chip, by `device_kind` prefix (vendor figures).
CHIP_PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
                   "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12,
                   "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def measured_matmul_flops(n: int = 2048, iters: int = 5) -> float:
    """fp32 matmul FLOP/s of the default device, measured (the MFU denominator on CPU): the fastest of
    `iters` runs after a warm-up (compilation) run."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "rdlm" / "peak_flops.json"


def best_measured(kind: str, measured: float) -> float:
    """The higher of `measured` and the best figure cached for this host, device kind and core count; a
    new best is written back. A cache that cannot be read or written only costs the cached figure."""
    path = peak_cache_file()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host = f"{socket.gethostname()} {kind} {cores} cores"
    try:
        cache = json.loads(path.read_text())
        cached = float(cache[host]) if isinstance(cache, dict) and host in cache else 0.0
    except (OSError, ValueError, TypeError):  # absent, unreadable or not ours: start a new one
        cache, cached = {}, 0.0
    if measured <= cached:
        return cached
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # whole or not at all, as runs may race
        tmp.write_text(json.dumps({**cache, host: measured}, indent=1) + "\n")
        tmp.replace(path)
    except OSError:
        pass
    return measured


def peak_flops() -> tuple[float, str]:
    """(FLOP/s of all devices of the run, how it was found): RDLM_PEAK_FLOPS when set, the vendor peak
    for known TPUs/GPUs, else the fp32 matmul peak measured on this CPU host (or the best earlier one)."""
    if value := os.environ.get(PEAK_ENV):  # set and not empty
        try:
            peak = float(value)
        except ValueError:
            peak = 0.0
        if not 0 < peak < float("inf"):
            raise ConfigError(f"{PEAK_ENV}={value!r} is not a positive number of FLOP/s (e.g. 2.5e11); unset it to "
                              "use the vendor peak or a measurement")
        return peak, PEAK_ENV
    kind = jax.devices()[0].device_kind
    for prefix, per_chip in CHIP_PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return per_chip * jax.device_count(), f"{kind} bf16 peak"
    measured = measured_matmul_flops()
    best = best_measured(kind, measured)
    source = f"measured fp32 matmul on {kind}"
    return best, source if best == measured else f"{source} (best on this host, {peak_cache_file()})"
