"""Will a generation fit? An estimate of its device bytes against what its devices have free, checked
before compiling, so a call that cannot fit is refused with what would."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdlm.config import ModelConfig
from rdlm.inference.cache import STRATEGIES, cache_bytes, cache_layout, cache_slots, nbytes
from rdlm.inference.checks import GenerateError
from rdlm.inference.engine import Spec

Params = dict[str, Any]


# XLA:CPU computes bf16 matmuls in fp32 and keeps an fp32 copy of each bf16 weight next to it
CPU_UPCAST_HINT = ("; on CPU, XLA keeps an fp32 copy of every bf16 weight: model.dtype=float32 with float32 weights "
                   "(rdlm.load_checkpoint widens them there) holds one copy")


def generation_bytes(cfg: ModelConfig, spec: Spec, batch: int, prompt_len: int, T: int) -> int:
    """Estimated device bytes of one generation call besides the parameters: the KV cache (`cache_bytes`),
    the new tokens' core entries, attention scores, MLP activations and logits of the largest pass (the
    prompt, or a verified draft), and the exit values kept per step. A lower bound of what XLA allocates,
    so a call it refuses cannot fit."""
    L = max(prompt_len, spec.lookahead if spec.draft_steps else 1)
    fresh = nbytes(cache_layout(cfg, batch, L, cache_slots(spec.strategy, spec.num_steps, cfg)).core)
    activations = batch * L * (cfg.n_heads * (T + L) + 3 * cfg.n_embd + 2 * cfg.intermediate_size) * 4
    logits = batch * (L if spec.draft_steps else 1) * cfg.vocab_size * 4
    values = 0 if spec.draft_steps else batch * spec.max_new_tokens * spec.num_steps * 4
    return cache_bytes(cfg, batch, T, spec.num_steps, spec.strategy) + fresh + activations + logits + values


def _host_available_bytes() -> int | None:
    """Host memory this process may still use: MemAvailable from /proc/meminfo (else free physical pages),
    capped by a cgroup v2 limit; None where none of these can be read."""
    free = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        free = int(line.split()[1]) * 1024
    if free is None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):  # memory.max is "max" when unlimited
        cgroup = Path("/sys/fs/cgroup")
        room = int((cgroup / "memory.max").read_text()) - int((cgroup / "memory.current").read_text())
        free = room if free is None else min(free, room)
    return free


def available_bytes(devices: Sequence[jax.Device]) -> int | None:
    """Bytes free for a generation on `devices`: the sum of what each accelerator reports free, or the host's
    available memory where devices report none (CPU: all share the host's); None when unknown (no check)."""
    stats = [d.memory_stats() or {} for d in devices]
    if all("bytes_limit" in st for st in stats):
        return sum(st["bytes_limit"] - st.get("bytes_in_use", 0) for st in stats)
    return _host_available_bytes()


def _largest(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in [1, high] with `fits(n)` (true up to some n, false after), or 0 if none."""
    low = 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_memory(params: Params, cfg: ModelConfig, spec: Spec, batch: int, prompt_len: int, T: int,
                 mesh: jax.sharding.Mesh | None) -> None:
    """Refuse, before compiling, a call whose estimated memory exceeds what its devices have free, naming
    the cache strategies and the largest num_steps that would fit. Parameters count where they will be
    copied (a mesh reshards them; host arrays are transferred); those on the device already are in use.
    Over several hosts, each checks its own devices for its share."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    local = [d for d in devices if d.process_index == jax.process_index()]
    free = available_bytes(local)
    if free is None:
        return
    leaves = [x for x in jax.tree.leaves(params) if mesh is not None or not isinstance(x, jax.Array)]
    copied = sum(x.size * np.dtype(x.dtype).itemsize for x in leaves)
    upcast = local[0].platform == "cpu" and jnp.dtype(cfg.dtype).itemsize < 4
    if upcast:  # XLA:CPU runs bf16 matmuls in fp32 and keeps an fp32 copy of every weight besides it
        copied += 4 * sum(x.size for x in jax.tree.leaves(params))

    def need(**change: Any) -> int:
        total = copied + generation_bytes(cfg, dataclasses.replace(spec, **change), batch, prompt_len, T)
        return total * len(local) // len(devices)

    if need() <= free:
        return
    c = cfg.n_layers_in_recurrent_block
    fits = [s for s in STRATEGIES if "<" not in s and s != spec.strategy and need(strategy=s) <= free]
    slots = _largest(lambda k: need(strategy=f"compress-s{k * c}") <= free, spec.num_steps - 1)
    fits += [f"compress-s{c}" + (f" up to compress-s{slots * c}" if slots > 1 else "")] if slots else []
    steps = _largest(lambda n: need(num_steps=n) <= free, spec.num_steps - 1)
    ways = [f"cache_strategy {' or '.join(fits)}"] if fits else []
    ways += [f"num_steps <= {steps}"] if steps else []
    where = "the host" if local[0].platform == "cpu" else f"{len(local)} x {local[0].device_kind}"
    cache = cache_bytes(cfg, batch, T, spec.num_steps, spec.strategy)
    raise GenerateError(
        f"generation needs about {_gib(need())} (KV cache {_gib(cache)} with cache_strategy={spec.strategy!r} and "
        f"num_steps={spec.num_steps}) but {where} has {_gib(free)} free; "
        + (f"{' or '.join(ways)} would fit" if ways else "even one step does not fit: fewer prompts or max_new_tokens"),
        hint="the cache keeps one entry per (recurrence step, core layer); compress strategies share slots"
        + (CPU_UPCAST_HINT if upcast else ""))
