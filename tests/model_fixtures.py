"""Tiny model configs, synthetic packed batches and one sharded train step, shared by the model
and step tests."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm.models import ModelConfig, Transformer
from jaxlm.parallel import sharding
from jaxlm.run.optim import learning_rate_schedule, make_optimizer
from jaxlm.run.train_state import TrainState, init_sharded_state
from jaxlm.stages import pretrain

LLAMA_TINY = ModelConfig(vocab_size=250, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, d_ff=64, max_seq_len=16)
GPT2_TINY = ModelConfig(vocab_size=250, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                        head_dim=8, d_ff=64, max_seq_len=16, position_embedding="learned",
                        norm="layernorm", mlp_activation="gelu", use_bias=True,
                        tie_embeddings=True)


def init_params(cfg: ModelConfig, seed: int = 0, length: int = 8) -> Any:
    """Unboxed random params of Transformer(cfg), from a jitted init (an eager Flax init
    traces and compiles its layer scan op by op, seconds for a tiny model)."""
    boxed = jax.jit(Transformer(cfg).init)(jax.random.key(seed),
                                           jnp.zeros((1, length), jnp.int32))["params"]
    return nn.meta.unbox(boxed)


def packed_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows holding 2-3 documents each (plus padding in some rows), next-token layout."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(batch, length + 1)).astype(np.int32)
    seg = np.zeros((batch, length + 1), np.int32)
    pos = np.zeros((batch, length + 1), np.int32)
    for b in range(batch):
        cuts = sorted(rng.choice(np.arange(2, length - 1), size=2, replace=False))
        end = length + 1 - (b % 2) * 2  # odd rows end in 2 padding tokens
        bounds = [0, *cuts, end]
        for i in range(len(bounds) - 1):
            seg[b, bounds[i]:bounds[i + 1]] = i + 1
            pos[b, bounds[i]:bounds[i + 1]] = np.arange(bounds[i + 1] - bounds[i])
    inputs_seg, target_seg = seg[:, :-1], seg[:, 1:]
    mask = ((inputs_seg == target_seg) & (inputs_seg > 0)).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": inputs_seg,
            "positions": pos[:, :-1], "loss_mask": mask}


def one_pretrain_step(mesh: jax.sharding.Mesh, batch: dict[str, np.ndarray], microbatches: int = 1
                      ) -> tuple[Any, dict[str, np.ndarray], TrainState]:
    """One jitted `pretrain_step` of LLAMA_TINY from a fixed init, state and batch sharded over
    `mesh`: (new params and metrics on the host, the new sharded state). Equal on every mesh
    up to float reordering, which is what the sharding tests compare.

    A large Adam eps keeps the first update linear in small gradients, so comparing params
    after one step compares gradients rather than the sign of fp32 noise.
    """
    config = ml_collections.ConfigDict({"optim": dict(
        learning_rate=1e-2, warmup_steps=0, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-3,
        weight_decay=0.1, decay_embeddings=False, clip_norm=1.0)})
    model = Transformer(LLAMA_TINY)
    tx = make_optimizer(config.optim, total_steps=10)
    schedule = learning_rate_schedule(config.optim, 10)
    state, shardings = init_sharded_state(model, tx, mesh, jax.random.key(0), 16)
    step = functools.partial(pretrain.pretrain_step, model=model, tx=tx, lr_schedule=schedule,
                             grad_accum_steps=microbatches)
    with sharding.activate(mesh):
        jitted = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                         out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
        new_state, metrics = jitted(state, sharding.global_batch(batch, mesh))
    return jax.device_get(new_state.params), jax.device_get(metrics), new_state


def attention_inputs(b: int, length: int, heads: int, kv_heads: int, k: int, seed: int = 0,
                     q_scale: float = 1.0):
    """((q, k, v), segment_ids, cotangent) for attention kernels: random [B, L, *, K] arrays
    (queries times `q_scale`, to make scores large), sorted segments with trailing padding."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = q_scale * jax.random.normal(keys[0], (b, length, heads, k))
    kk = jax.random.normal(keys[1], (b, length, kv_heads, k))
    v = jax.random.normal(keys[2], (b, length, kv_heads, k))
    ct = jax.random.normal(keys[3], (b, length, heads, k))
    rng = np.random.default_rng(seed)
    seg = np.sort(rng.integers(1, 4, size=(b, length)), axis=1).astype(np.int32)
    seg[-1, -3:] = 0  # trailing padding: its own "document"
    return (q, kk, v), jnp.asarray(seg), ct
