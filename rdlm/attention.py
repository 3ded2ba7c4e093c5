"""Causal self-attention, by `model.attention`: one switch for every backend.

- `xla`: the reference. fp32 scores `[batch, heads, seq, seq]`, masked, softmax, in plain XLA.
- `chunked`: query blocks against key blocks with an online softmax (flash attention in plain XLA):
  scores of one block pair at a time instead of `[seq, seq]`, key blocks above the diagonal skipped;
  the backward recomputes each block pair, keeping only the running softmax state. Any backend, any
  length (padded to the block).
- `splash`: the Pallas TPU splash-attention kernel (jax.experimental.pallas.ops.tpu), forward and
  backward, causal with segment ids. Mosaic kernels cannot be partitioned by XLA, so under a mesh it
  runs in `shard_map` (batch over the batch rule's axes, heads over the heads rule's); on CPU it runs in
  Pallas interpret mode (tests; slow).
- `cudnn`: fused flash attention on NVIDIA GPUs (`jax.nn.dot_product_attention(implementation="cudnn")`).
- `auto`: `splash` on TPU, `cudnn` on GPU (bf16 compute; fp32 as on CPU), and otherwise `xla` below
  `CHUNKED_FROM` positions, else `chunked`.

All take `q, k, v [batch, seq, heads, head_dim]` and return `[batch, seq, heads, head_dim]`. The kernels
mask causally by index within each segment (packed documents: positions restart at each segment start,
so this equals `xla`'s mask by position).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from rdlm import sharding

IMPLEMENTATIONS = ("auto", "xla", "chunked", "splash", "cudnn")
CHUNKED_FROM = 2048  # on CPU, `auto` picks `chunked` from this many positions on
CHUNK = 512  # query and key block of `chunked`
SPLASH_BLOCK = 512  # splash tiles (largest that divides the padded length; at least 128)


def attention_scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled fp32 scores `[b,n,q,k]` of `q [b,q,n,d]` against `k [b,k,n,d]`, masked out where not `mask`."""
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
    return jnp.where(mask, scores, jnp.finfo(jnp.float32).min)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention of `q [b,q,n,d]` over `k, v [b,k,n,d]` where `mask [b,1,q,k]`."""
    probs = jax.nn.softmax(attention_scores(q, k, mask), axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", probs, v)


def attention_mask(positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """`[batch, 1, q, k]`: causal by position, and within one packed segment when ids are given."""
    mask = positions[:, :, None] >= positions[:, None, :]
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return mask[:, None]


def resolve(implementation: str, seq: int, dtype: jnp.dtype) -> str:
    """The implementation `auto` stands for on this backend, length and dtype (others as given); cudnn's
    fused attention takes only 16-bit inputs."""
    if implementation != "auto":
        return implementation
    backend = sharding.platform()
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    return "chunked" if seq >= CHUNKED_FROM else "xla"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                     implementation: str) -> jax.Array:
    """Self-attention of a sequence over itself by `implementation` (one of `IMPLEMENTATIONS`)."""
    impl = resolve(implementation, q.shape[1], q.dtype)
    if impl == "xla":
        return attend(q, k, v, attention_mask(positions, segment_ids))
    segments = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if impl == "chunked":
        return chunked(q, k, v, segments)
    if impl == "splash":
        return splash(q, k, v, segments, interpret=sharding.platform() != "tpu")
    if impl == "cudnn":
        return fused(q, k, v, segments, "cudnn")
    raise ValueError(f"unknown attention implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")


def _pad(x: jax.Array, length: int, value: int = 0) -> jax.Array:
    """Pad dimension 1 to `length`."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)


# The online softmax (flash attention's): keys and values folded in one block at a time into a running
# (max score, sum of exponentials, fp32 output `[b, n, q, d]`), never the whole score row.
Softmax = tuple[jax.Array, jax.Array, jax.Array]


def softmax_init(b: int, q: int, n: int, d: int) -> Softmax:
    """The running softmax of `q` queries before any key."""
    return jnp.full((b, n, q), jnp.finfo(jnp.float32).min), jnp.zeros((b, n, q)), jnp.zeros((b, n, q, d))


def softmax_update(carry: Softmax, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> Softmax:
    """Fold in the keys/values `k, v [b, k, n, d]` that `q [b, q, n, d]` sees where `mask [b|1, 1, q, k]`."""
    top, total, acc = carry
    scores = attention_scores(q, k, mask)
    new_top = jnp.maximum(top, scores.max(-1))
    probs = jnp.where(mask, jnp.exp(scores - new_top[..., None]), 0.0)
    scale = jnp.exp(top - new_top)
    acc = acc * scale[..., None] + jnp.einsum("bnqk,bknd->bnqd", probs.astype(v.dtype), v,
                                              preferred_element_type=jnp.float32)
    return new_top, total * scale + probs.sum(-1), acc


def softmax_result(carry: Softmax, dtype: jnp.dtype) -> jax.Array:
    """The attention output `[b, q, n, d]` of a finished running softmax."""
    _, total, acc = carry
    return (acc / total[..., None]).astype(dtype).transpose(0, 2, 1, 3)


def chunked(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, block: int | None = None) -> jax.Array:
    """Flash attention in XLA: for each query block, an online softmax over the key blocks at or below the
    diagonal (`cond` skips the rest). Padding positions get segment -1: no real token sees them."""
    b, T, n, d = q.shape
    B = min(block or CHUNK, T)
    Tp = -(-T // B) * B
    nb = Tp // B
    q, k, v = (_pad(x, Tp).reshape(b, nb, B, n, d) for x in (q, k, v))
    seg = _pad(segments, Tp, -1).reshape(b, nb, B)
    local = jnp.arange(B)

    @jax.checkpoint
    def query_block(i):
        qi, si = q[:, i], seg[:, i]

        def key_block(carry, j):
            @jax.checkpoint  # the backward keeps the running (max, sum, output), not every block's scores
            def update(carry):
                mask = ((i * B + local)[:, None] >= (j * B + local)[None, :]) & (si[:, :, None] == seg[:, j][:, None])
                return softmax_update(carry, qi, k[:, j], v[:, j], mask[:, None])
            return jax.lax.cond(j <= i, update, lambda c: c, carry), None

        carry, _ = jax.lax.scan(key_block, softmax_init(b, B, n, d), jnp.arange(nb))
        return softmax_result(carry, v.dtype)

    out = jax.lax.map(query_block, jnp.arange(nb))  # [nb, b, B, n, d]
    return out.transpose(1, 0, 2, 3, 4).reshape(b, Tp, n, d)[:, :T]


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, length: int, interpret: bool) -> splash_kernel.SplashAttentionKernel:
    """A causal multi-head splash kernel for one device's heads (the mask is built once per shape)."""
    block = max(b for b in (SPLASH_BLOCK, 256, 128) if length % b == 0)
    sizes = splash_kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                     block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                     block_kv_dq=block)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * heads)
    return splash_kernel.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                         interpret=interpret)


def splash(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, interpret: bool = False) -> jax.Array:
    """The splash kernel over `[b, T, n, d]` (T padded to a multiple of 128; padding in segment -1)."""
    b, T, n, d = q.shape
    Tp = -(-T // 128) * 128
    q = (q.astype(jnp.float32) / np.sqrt(d)).astype(q.dtype)  # the kernel does not scale
    q, k, v = (_pad(x, Tp).transpose(0, 2, 1, 3) for x in (q, k, v))  # [b, n, Tp, d]
    seg = _pad(segments, Tp, -1)

    def local(q, k, v, seg):
        kernel = _splash_kernel(q.shape[1], Tp, interpret)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(s, s)))(q, k, v, seg)

    active = sharding.active()
    if active is None:
        out = local(q, k, v, seg)
    else:  # Mosaic kernels are opaque to the partitioner: run per device in shard_map
        mesh, rules = active
        heads = sharding.logical_spec("attention", (b, n, Tp, d), ("batch", "heads", None, None), rules, mesh)
        rows = PartitionSpec(heads[0], None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, rows), out_specs=heads,
                            check_vma=False)(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)[:, :T]


def fused(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` (cudnn on GPU) with the causal and segment masks."""
    mask = (segments[:, :, None] == segments[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
