"""Multi-head attention with grouped-query heads, RoPE, packed-sequence (segment) masking and
optional sliding windows.

A sliding window W lets query l see only the keys m with l - W < m <= l (W tokens including
itself), as Mistral and Gemma's local layers do. Every implementation takes `window`: 0 (or
None) = plain causal attention; a Python int is static; a traced int32 scalar (one per layer
under scan, for models that alternate local and global layers) is supported by the XLA
reference, blocked and chunked paths.

Every implementation also takes `softcap`: C > 0 replaces the scaled scores s by
C * tanh(s / C) before masking (Gemma 2's attention-logit soft-capping); 0 = off.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import kv_cache, lora
from jaxlm.models.chunked_attention import chunked_attention
from jaxlm.models.config import ModelConfig
from jaxlm.models.kernel_attention import cudnn_attention, splash_attention
from jaxlm.models.mlp import linear
from jaxlm.models.norms import Norm
from jaxlm.models.quant import matmul
from jaxlm.models.rope import NO_SCALING, apply_rope
from jaxlm.models.softcap import softcap as apply_softcap
from jaxlm.models.softcap import softcap_grad
from jaxlm.parallel import sharding

Window = int | jax.Array | None


def visible(q_idx: jax.Array, k_idx: jax.Array, window: Window) -> jax.Array:
    """Causal (k <= q) and, with a window W, within it (q - k < W); broadcasts its inputs."""
    ok = k_idx <= q_idx
    if window is None or isinstance(window, int):
        return ok & (q_idx - k_idx < window) if window else ok
    return ok & ((q_idx - k_idx < window) | (window <= 0))  # traced: 0 = no window


def attention_mask(segment_ids_BxL: jax.Array, window: Window = None) -> jax.Array:
    """[B, L, L] boolean: query l may see key m iff m <= l (and l - m < window, if any) and
    both lie in the same document."""
    idx_L = jnp.arange(segment_ids_BxL.shape[1])
    causal_LxL = visible(idx_L[:, None], idx_L[None, :], window)
    same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return causal_LxL[None] & same_doc_BxLxL


def xla_attention(q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array, v_BxLxNxK: jax.Array,
                  segment_ids_BxL: jax.Array, window: Window = None, softcap: float = 0.0
                  ) -> jax.Array:
    """Reference attention in plain XLA ops; softmax in float32.

    H query heads share N key/value heads in groups of G = H / N.
    """
    b, length, h, k = q_BxLxHxK.shape
    n = k_BxLxNxK.shape[2]
    q_BxLxNxGxK = q_BxLxHxK.reshape(b, length, n, h // n, k) * jnp.asarray(k**-0.5,
                                                                           q_BxLxHxK.dtype)
    scores_BxNxGxLxM = jnp.einsum("blngk,bmnk->bnglm", q_BxLxNxGxK, k_BxLxNxK,
                                  preferred_element_type=jnp.float32)
    scores_BxNxGxLxM = apply_softcap(scores_BxNxGxLxM, softcap)
    mask_Bx1x1xLxM = attention_mask(segment_ids_BxL, window)[:, None, None]
    scores_BxNxGxLxM = jnp.where(mask_Bx1x1xLxM, scores_BxNxGxLxM, jnp.finfo(jnp.float32).min)
    probs_BxNxGxLxM = jax.nn.softmax(scores_BxNxGxLxM, axis=-1).astype(v_BxLxNxK.dtype)
    out_BxLxNxGxK = jnp.einsum("bnglm,bmnk->blngk", probs_BxNxGxLxM, v_BxLxNxK)
    return out_BxLxNxGxK.reshape(b, length, h, k)


def _barrier_t(x: jax.Array) -> jax.Array:
    """x with its last two axes swapped, as a materialised array.

    The barrier stops XLA from folding the transpose into the next dot's dimension numbers: on
    CPU a dot whose operands are row-major with the contraction innermost runs on the fast
    (YNNPACK) path, a dot with a transposed operand falls back to a slower one.
    """
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _query_blocks(length: int) -> int:
    """Query blocks for causal skipping: block i (rows [i*L/n, (i+1)*L/n)) sees keys < (i+1)*L/n.

    n blocks do (n+1)/(2n) of the full [L, L] work. Blocks of about 64 rows measured best on
    CPU at L=256 (4 blocks: -3% step time vs 2, 8 were slower); at most 8 blocks keep the
    unrolled graph small.
    """
    blocks = max(1, min(8, length // 64))
    while length % blocks:
        blocks -= 1
    return blocks


def _block_mask(segment_ids_BxL, rows: slice, keys: int, window: Window) -> jax.Array:
    """[B, 1, 1, rows, keys] boolean: causal (within the window) and same document."""
    seg_rows_BxR = segment_ids_BxL[:, rows]
    seg_keys_BxM = segment_ids_BxL[:, :keys]
    causal_RxM = visible(jnp.arange(rows.start, rows.stop)[:, None], jnp.arange(keys)[None, :],
                         window)
    same_doc_BxRxM = seg_rows_BxR[:, :, None] == seg_keys_BxM[:, None, :]
    return (causal_RxM[None] & same_doc_BxRxM)[:, None, None]


def _blocks(length: int, nblocks: int) -> list[tuple[slice, int]]:
    size = length // nblocks
    return [(slice(i * size, (i + 1) * size), (i + 1) * size) for i in range(nblocks)]


def _rows(x_BxNxGxLxK: jax.Array, rows: slice) -> jax.Array:
    """The query-block rows of [B, N, G, L, K] as [B, N, G*R, K]."""
    b, n, g, _, k = x_BxNxGxLxK.shape
    return x_BxNxGxLxK[:, :, :, rows].reshape(b, n, g * (rows.stop - rows.start), k)


def _block_scores(q_BxNxQxK, kt_BxNxKxM, cap):
    """Soft-capped q k^T of one query block, float32 [B, N, G*R, M]."""
    scores = jnp.einsum("bnqk,bnkm->bnqm", q_BxNxQxK, kt_BxNxKxM,
                        preferred_element_type=jnp.float32)
    return apply_softcap(scores, cap)


def _block_probs(q_BxNxQxK, kt_BxNxKxM, mask_Bx1x1xRxM, group, cap):
    """Masked softmax(softcap(q k^T)) of one query block, float32 [B, N, G*R, M]."""
    b, n, q_rows, _ = q_BxNxQxK.shape
    scores = _block_scores(q_BxNxQxK, kt_BxNxKxM, cap).reshape(b, n, group, q_rows // group, -1)
    scores = jnp.where(mask_Bx1x1xRxM, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).reshape(b, n, q_rows, -1)


def _attention_forward(q_BxNxGxLxK, kt_BxNxKxM, v_BxNxMxK, segment_ids_BxL, window, cap):
    """Output [B, N, G, L, K] and the per-block probabilities (in the value dtype)."""
    b, n, g, length, k = q_BxNxGxLxK.shape
    outs, probs = [], []
    for rows, keys in _blocks(length, _query_blocks(length)):
        p = _block_probs(_rows(q_BxNxGxLxK, rows), kt_BxNxKxM[..., :keys],
                         _block_mask(segment_ids_BxL, rows, keys, window),
                         g, cap).astype(v_BxNxMxK.dtype)
        out = jnp.einsum("bnqm,bnmk->bnqk", p, v_BxNxMxK[:, :, :keys])
        outs.append(out.reshape(b, n, g, -1, k))
        probs.append(p)
    return jnp.concatenate(outs, axis=3), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_core(q_BxNxGxLxK, kt_BxNxKxM, v_BxNxMxK, segment_ids_BxL, window, cap):
    """softmax(softcap(q k^T) + mask) v for pre-scaled q; kt = k transposed; G query heads per
    kv head; `cap` (static) is the soft-cap, 0 = none.

    The G query heads of a kv head are stacked into one [G*rows, K] operand (one dot per kv
    head instead of G). Queries are split into blocks that skip the keys the causal mask hides
    (`_query_blocks`). The backward pass keeps only the probabilities and never transposes an
    [L, L]-sized array.
    """
    return _attention_forward(q_BxNxGxLxK, kt_BxNxKxM, v_BxNxMxK, segment_ids_BxL, window,
                              cap)[0]


def _attention_core_fwd(q, kt, v, segment_ids, window, cap):
    out, probs = _attention_forward(q, kt, v, segment_ids, window, cap)
    return out, (q, kt, v, segment_ids, window, out, probs)


def _attention_core_bwd(cap, res, dout_BxNxGxLxK):
    """d scores = p * (dp - rowsum(dp * p)), with rowsum(dp * p) = rowsum(dout * out); with a
    soft-cap, times 1 - tanh^2 of the block's scores (recomputed: only p is saved).

    d k and d v are produced transposed ([K, M]) so that only [rows, K]-sized operands are
    transposed; each query block adds into the first `keys` columns.
    """
    q, kt, v, segment_ids, window, out, probs = res
    del segment_ids, window  # the masks are in the saved probabilities
    length = q.shape[3]
    vt_BxNxKxM, k_BxNxMxK = _barrier_t(v), _barrier_t(kt)
    row_BxNxGxL = jnp.sum(dout_BxNxGxLxK.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dq_blocks, dkt, dvt = [], jnp.zeros(kt.shape, jnp.float32), jnp.zeros(kt.shape, jnp.float32)
    for (rows, keys), p in zip(_blocks(length, _query_blocks(length)), probs):
        dout_i = _rows(dout_BxNxGxLxK, rows)
        dp = jnp.einsum("bnqk,bnkm->bnqm", dout_i, vt_BxNxKxM[..., :keys],
                        preferred_element_type=jnp.float32)
        row_i = row_BxNxGxL[:, :, :, rows].reshape(dp.shape[:3])
        ds = p.astype(jnp.float32) * (dp - row_i[..., None])
        if cap:
            ds = ds * softcap_grad(_block_scores(_rows(q, rows), kt[..., :keys], cap), cap)
        ds = ds.astype(q.dtype)
        dq_i = jnp.einsum("bnqm,bnmk->bnqk", ds, k_BxNxMxK[:, :, :keys])
        dq_blocks.append(dq_i.reshape(*q.shape[:3], -1, q.shape[4]))
        dkt = dkt.at[..., :keys].add(
            jnp.einsum("bnkq,bnqm->bnkm", _barrier_t(_rows(q, rows)), ds,
                       preferred_element_type=jnp.float32))
        dvt = dvt.at[..., :keys].add(
            jnp.einsum("bnkq,bnqm->bnkm", _barrier_t(dout_i), p,
                       preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dq_blocks, axis=3)
    return dq, dkt.astype(kt.dtype), jnp.swapaxes(dvt, -1, -2).astype(v.dtype), None, None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def fused_attention(q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array, v_BxLxNxK: jax.Array,
                    segment_ids_BxL: jax.Array, window: Window = None, softcap: float = 0.0
                    ) -> jax.Array:
    """Same function as `xla_attention`, with a hand-written backward pass (`_attention_core`)."""
    b, length, h, k = q_BxLxHxK.shape
    n = k_BxLxNxK.shape[2]
    q_BxLxNxGxK = q_BxLxHxK.reshape(b, length, n, h // n, k) * jnp.asarray(k**-0.5,
                                                                           q_BxLxHxK.dtype)
    q_BxNxGxLxK = jnp.transpose(q_BxLxNxGxK, (0, 2, 3, 1, 4))
    kt_BxNxKxM = jnp.transpose(k_BxLxNxK, (0, 2, 3, 1))
    v_BxNxMxK = jnp.transpose(v_BxLxNxK, (0, 2, 1, 3))
    window = jnp.asarray(0 if window is None else window, jnp.int32)  # 0: no window
    out_BxNxGxLxK = _attention_core(q_BxNxGxLxK, kt_BxNxKxM, v_BxNxMxK, segment_ids_BxL, window,
                                    float(softcap))
    return jnp.transpose(out_BxNxGxLxK, (0, 3, 1, 2, 4)).reshape(b, length, h, k)


AUTO_ATTENTION = {"cpu": "blocked", "gpu": "cudnn", "tpu": "splash"}
SPLASH_LENGTH_MULTIPLE = 128  # Splash's blocks are whole multiples of the TPU's 128 lanes


def resolve_attention(name: str, platform: str | None = None, softcap: float = 0.0,
                      length: int = 0) -> str:
    """The implementation `name` selects on `platform` (default: JAX's default backend);
    "auto" picks the fused kernel of the platform: cuDNN on GPU, Splash on TPU, blocked on CPU.
    With a soft-cap (model.attn_logit_softcap), which cuDNN cannot apply, GPUs get "chunked";
    a sequence `length` (when given) that is not a multiple of 128 gets "xla" on TPU, since
    Splash has no block for it.
    """
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    impl = AUTO_ATTENTION.get("gpu" if platform in ("cuda", "rocm") else platform, "xla")
    if impl == "splash" and length % SPLASH_LENGTH_MULTIPLE:
        return "xla"
    return "chunked" if impl == "cudnn" and softcap else impl


ATTENTION_FUNCTIONS = {"xla": xla_attention, "blocked": fused_attention,
                       "chunked": chunked_attention, "cudnn": cudnn_attention,
                       "splash": splash_attention}


class Attention(nn.Module):
    """Self-attention: q/k/v projections, RoPE (if configured), attention, output projection.

    decode=True attends over a KV cache (the "cache" collection, see `jaxlm.models.kv_cache`):
    segment_ids then mark which of the new tokens are real (non-zero) or padding.
    """

    cfg: ModelConfig
    decode: bool = False
    window: int = 0

    def _proj(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]
              ) -> tuple[matmul.Weight, tuple[jax.Array, jax.Array] | None]:
        """Weight `name` flattened to [in, out] as its matmul takes it
        (`jaxlm.models.quant.matmul.weight`: the compute dtype, or still quantized), and its LoRA
        adapter."""
        cfg = self.cfg
        init = matmul.initializer(nn.initializers.normal(cfg.init_std), cfg.quant, name)
        w = self.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.weight_dtype)
        w = matmul.weight(w, cfg.quant, name, cfg.dtype)
        return matmul.flatten(w, 2 if name == "wo" else 1), lora.adapter(self, name, shape, axes)

    def _bias(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
        return self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape,
                          self.cfg.weight_dtype).astype(self.cfg.dtype)

    def _rope(self, q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array, positions_BxL: jax.Array,
              window: Window) -> tuple[jax.Array, jax.Array]:
        """RoPE of the model; sliding-window layers use `rope_local_theta` when it is set
        (chosen per layer: statically, or by the traced window under scan)."""
        cfg = self.cfg

        def rotate(theta, scaling):
            return (apply_rope(q_BxLxHxK, positions_BxL, theta, scaling),
                    apply_rope(k_BxLxNxK, positions_BxL, theta, scaling))

        if not cfg.rope_local_theta or not cfg.sliding_window:
            return rotate(cfg.rope_theta, cfg.rope_scaling)
        if isinstance(window, int):
            return (rotate(cfg.rope_local_theta, NO_SCALING) if window
                    else rotate(cfg.rope_theta, cfg.rope_scaling))
        local, full = rotate(cfg.rope_local_theta, NO_SCALING), rotate(cfg.rope_theta,
                                                                       cfg.rope_scaling)
        return tuple(jnp.where(window > 0, a, b) for a, b in zip(local, full))

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                 segment_ids_BxL: jax.Array, layer_window: jax.Array | None = None
                 ) -> jax.Array:
        """`layer_window`: this layer's window as a traced scalar (scanned layers that
        alternate local and global attention); else the static `window` attribute."""
        cfg = self.cfg
        window = self.window if layer_window is None else layer_window
        d, h, n, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq = self._proj("wq", (d, h, k), ("embed", "heads", "head_dim"))
        wk = self._proj("wk", (d, n, k), ("embed", "kv_heads", "head_dim"))
        wv = self._proj("wv", (d, n, k), ("embed", "kv_heads", "head_dim"))
        wo = self._proj("wo", (h, k, d), ("heads", "head_dim", "embed"))
        project = lambda x, w_and_adapter: lora.project(
            self, functools.partial(linear, cfg), x, *w_and_adapter)

        b, length = x_BxLxD.shape[:2]
        q_BxLxHxK = project(x_BxLxD, wq).reshape(b, length, h, k)
        k_BxLxNxK = project(x_BxLxD, wk).reshape(b, length, n, k)
        v_BxLxNxK = project(x_BxLxD, wv).reshape(b, length, n, k)
        if cfg.use_bias or cfg.qkv_bias:
            q_BxLxHxK += self._bias("bq", (h, k), ("heads", "head_dim"))
            k_BxLxNxK += self._bias("bk", (n, k), ("kv_heads", "head_dim"))
            v_BxLxNxK += self._bias("bv", (n, k), ("kv_heads", "head_dim"))
        q_BxLxHxK = sharding.constrain(q_BxLxHxK, ("act_batch", "act_length", "act_heads", None))
        k_BxLxNxK = sharding.constrain(k_BxLxNxK, ("act_batch", "act_length", "act_kv_heads",
                                                   None))
        if cfg.qk_norm:  # RMSNorm over each head's K features
            q_BxLxHxK = Norm(cfg, name="q_norm")(q_BxLxHxK.reshape(b, length * h, k)).reshape(
                b, length, h, k)
            k_BxLxNxK = Norm(cfg, name="k_norm")(k_BxLxNxK.reshape(b, length * n, k)).reshape(
                b, length, n, k)
        if cfg.position_embedding == "rope":
            q_BxLxHxK, k_BxLxNxK = self._rope(q_BxLxHxK, k_BxLxNxK, positions_BxL, window)
        if cfg.attn_scale_dim:  # the kernels scale by k^-1/2; scores want attn_scale_dim^-1/2
            q_BxLxHxK = q_BxLxHxK * jnp.asarray((k / cfg.attn_scale_dim) ** 0.5, q_BxLxHxK.dtype)

        if self.decode:
            ring = bool(cfg.sliding_window) and not cfg.mixed_windows
            out_BxLxHxK = kv_cache.update_and_attend(
                self, q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, segment_ids_BxL, positions_BxL,
                window if cfg.sliding_window else None, ring)
        else:
            impl = resolve_attention(cfg.attention, softcap=cfg.attn_logit_softcap,
                                     length=length)
            out_BxLxHxK = ATTENTION_FUNCTIONS[impl](
                q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, segment_ids_BxL,
                window if cfg.sliding_window else None, softcap=cfg.attn_logit_softcap)
        out_BxLxD = project(out_BxLxHxK.reshape(b, length, h * k), wo)
        if cfg.use_bias:
            out_BxLxD += self._bias("bo", (d,), ("norm",))
        return out_BxLxD
