"""Fused attention kernels: cuDNN flash attention on NVIDIA GPUs, Splash attention on TPU.

Both compute the same function as `attention.xla_attention` (causal, packed-segment masked,
grouped-query) without materialising the [L, L] probabilities in HBM:

* `cudnn_attention`: `jax.nn.dot_product_attention(implementation="cudnn")`, causal via
  `is_causal=True`. jax 0.10.2's public API has no segment-id argument (`query_seq_lengths` only
  masks trailing padding), so packed documents are passed as a boolean `mask` [B, 1, L, L]
  that cuDNN reads as a bias: one O(B L^2) array per layer instead of O(B H L^2). Needs
  bfloat16/float16 inputs and a head dimension the cuDNN build supports (<= 128 or 256).
* `splash_attention`: the Pallas TPU kernel `jax.experimental.pallas.ops.tpu.splash_attention`
  with a static causal mask, segment ids for packing and native grouped-query heads. Pallas
  kernels are not partitioned by XLA, so under a mesh the kernel runs inside `shard_map`: the
  batch split over (data, fsdp, expert) and the heads over `tensor` (when it divides the kv
  heads).
  `interpret=True` runs the kernel in the Pallas interpreter (any backend; tests use it on CPU).

Sliding windows: both take a static `window` (a Python int; cuDNN's `local_window_size`,
Splash's `LocalMask`). A traced per-layer window (models that alternate local and global layers
under scan_layers) cannot select a kernel mask: that raises, naming model.scan_layers.

Soft-capped scores (model.attn_logit_softcap): Splash applies the cap itself
(`attn_logits_soft_cap`); jax's cuDNN attention has no soft-cap, so `cudnn_attention` raises,
naming the key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm.models.chunked_attention import block_size
from jaxlm.parallel import sharding
from jaxlm.run.errors import ConfigError

SPLASH_BLOCK = 512


def static_window(window: int | jax.Array | None, kernel: str) -> int:
    """The window as a Python int (0 = none); raises for a traced per-layer window."""
    if window is None:
        return 0
    if isinstance(window, int):
        return window
    raise ConfigError(f"config key model.attention: {kernel} attention needs the same sliding "
                     "window in every layer it is traced for; a model that alternates local "
                     "and global layers needs model.scan_layers=False (one static window per "
                     "layer) or model.attention='chunked'")


def cudnn_attention(q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array, v_BxLxNxK: jax.Array,
                    segment_ids_BxL: jax.Array, window: int | jax.Array | None = None,
                    softcap: float = 0.0, implementation: str = "cudnn") -> jax.Array:
    """cuDNN flash attention; raises (from jax) off NVIDIA GPUs or for unsupported shapes, and
    for a soft-cap. (`implementation="xla"` runs jax's reference of the same call, for tests
    off GPU.)"""
    if softcap:
        raise ConfigError(f"config key model.attn_logit_softcap: {softcap} soft-caps the "
                          "attention scores, which jax's cuDNN attention cannot do; set "
                          "model.attention='chunked' (O(L) memory) or 'xla' on GPU")
    w = static_window(window, "cudnn")
    same_doc_Bx1xLxL = (segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :])
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, mask=same_doc_Bx1xLxL,
                                        is_causal=True, local_window_size=(w - 1, 0) if w else None,
                                        implementation=implementation)


def _splash_local(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, segment_ids_BxL, window, softcap,
                  interpret):
    """The kernel on one shard: vmapped over the batch, heads-major [H, L, K] per example."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    length, h, kd = q_BxLxHxK.shape[1:]
    blk = block_size(length, SPLASH_BLOCK)
    sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                              block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                              block_kv_dq=blk)
    if window:  # causal within the window: keys q - (W - 1) .. q
        one_head = splash.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    else:
        one_head = splash.CausalMask((length, length))
    mask = splash.MultiHeadMask([one_head] * h)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    attn_logits_soft_cap=softcap or None, interpret=interpret)
    q_BxHxLxK = jnp.swapaxes(q_BxLxHxK * jnp.asarray(kd**-0.5, q_BxLxHxK.dtype), 1, 2)
    k_BxNxLxK, v_BxNxLxK = jnp.swapaxes(k_BxLxNxK, 1, 2), jnp.swapaxes(v_BxLxNxK, 1, 2)

    def one(q, k, v, seg):
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))

    out_BxHxLxK = jax.vmap(one)(q_BxHxLxK, k_BxNxLxK, v_BxNxLxK, segment_ids_BxL)
    return jnp.swapaxes(out_BxHxLxK, 1, 2)


def splash_attention(q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array, v_BxLxNxK: jax.Array,
                     segment_ids_BxL: jax.Array, window: int | jax.Array | None = None,
                     softcap: float = 0.0, interpret: bool = False) -> jax.Array:
    """Splash attention, sharded with `shard_map` over the current mesh (if any); `softcap` > 0
    soft-caps the scores inside the kernel."""
    w, cap = static_window(window, "splash"), float(softcap)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _splash_local(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, segment_ids_BxL, w, cap,
                             interpret)
    shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
    b, n = q_BxLxHxK.shape[0], k_BxLxNxK.shape[2]
    batch_axes = sharding.logical_to_mesh_spec(("act_batch",), (b,), shape)[0]
    # Query heads h = kv_head * G + g: splitting both over `tensor` keeps each group together.
    heads_axis = sharding.logical_to_mesh_spec(("act_kv_heads",), (n,), shape)[0]
    qkv_spec = P(batch_axes, None, heads_axis, None)
    return jax.shard_map(
        lambda q, k, v, s: _splash_local(q, k, v, s, w, cap, interpret), mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch_axes, None)), out_specs=qkv_spec,
        check_vma=False)(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, segment_ids_BxL)
