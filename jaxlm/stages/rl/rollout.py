"""Rollouts from the KV-cache decoder, and the per-token log-probs of the same sequences.

`rollout` runs inside one jit with the policy's params as they are sharded for training: each
prompt row is repeated G times (group g of prompt b is row b * G + g), sampled by
`jaxlm.inference.decode.sample`, and the sampling policy's per-token log-probs are kept: of
softmax(logits / rl.temperature), the distribution sampled (before top-k / top-p filtering, as
TRL keeps them), i.e. pi_old of the ratio objectives. Every later log-prob of the policy and
the reference (`sequence_logps(..., temperature=rl.temperature)`) is of the same tempered
distribution. The rollout decodes with a KV cache in the training precision whatever
model.kv_cache_dtype says (an int8 cache would make pi_old differ from the train step's).
`rollout_programs` builds the two jitted rollouts of an RL run (the training one, G sampled
completions per prompt, and the held-out one, one greedy completion) for `program.build`, with
explicit shardings, abstract inputs, FLOPs and the size of their KV cache.

A rollout row is laid out as [P prompt slots (left-padded) | T completion slots (right-padded)],
`valid` 1 on real tokens; `sequence_logps` runs the training model over such rows (segment 0 on
padding, positions counting real tokens only, so a row scores exactly like its unpadded tokens)
and returns log p(token) of the T completion slots.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm.data.config import split_list
from jaxlm.inference import decode
from jaxlm.inference.processing import SamplingParams, as_arrays
from jaxlm.losses.cross_entropy import token_logps
from jaxlm.parallel import sharding
from jaxlm.scaling import flops as scaling
from jaxlm.stages.rl.prompts import prompt_length
from jaxlm.stages.stage import JitProgram

if TYPE_CHECKING:
    from jaxlm.run.program import Program

# The Program's rollouts (`Program.programs` names).
ROLLOUT, EVAL_ROLLOUT = "rollout", "eval_rollout"


def rollout(params: Any, prompt_BxP: jax.Array, valid_BxP: jax.Array, rng: jax.Array,
            stop_S: jax.Array, *, lm: decode.LanguageModel, sampling: SamplingParams,
            group_size: int, max_new: int, pad_id: int = 0) -> dict[str, jax.Array]:
    """G completions per prompt: completion [B, G, T] (pad_id after a row's end), lengths
    [B, G] (stop token included), logps [B, G, T] (0 after the end)."""
    b = prompt_BxP.shape[0]
    tokens_NxP = jnp.repeat(prompt_BxP, group_size, axis=0)
    valid_NxP = jnp.repeat(valid_BxP, group_size, axis=0).astype(bool)
    n = tokens_NxP.shape[0]
    out = decode.sample(lm, params, tokens_NxP, valid_NxP, jnp.full((n,), max_new, jnp.int32),
                        jnp.tile(stop_S[None], (n, 1)), as_arrays(sampling), rng,
                        max_new=max_new, pad_id=pad_id, tempered_logprobs=True)
    return {"completion": out["tokens"].reshape(b, group_size, max_new),
            "lengths": out["lengths"].reshape(b, group_size),
            "logps": out["token_logprob"].reshape(b, group_size, max_new)}


def stop_width(config: ml_collections.ConfigDict) -> int:
    """Stop ids a rollout takes: EOS, chat.turn_end with rl.chat, and one per piece of rl.stop
    (unused slots hold -1)."""
    return (1 + int(config.rl.chat)
            + len(split_list(config.rl.stop.encode().decode("unicode_escape"))))


def rollout_program(program: Program, *, greedy: bool) -> JitProgram:
    """The jitted rollout of one global batch of prompts on the run's mesh: the policy's params
    in their training shardings, prompts and outputs over the data axes. greedy: one greedy
    completion per prompt (held-out evaluation); else rl.group_size sampled ones.

    Its FLOPs count every row's P prompt tokens and all rl.max_new_tokens decode iterations at
    the forward FLOPs of a token of data.seq_len context (an upper bound: the decode loop ends
    early once every row has stopped)."""
    c, mesh = program.config, program.mesh
    r = c.rl
    group = 1 if greedy else r.group_size
    sampling = SamplingParams() if greedy else SamplingParams(
        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
    # A policy with a value head (ppo) decodes with its vocab head, and with a KV cache in the
    # training precision (model.kv_cache_dtype is for inference).
    lm_cfg = dataclasses.replace(program.model_cfg, reward_head=False, kv_cache_dtype="")
    lm = decode.TransformerLM(lm_cfg)
    b, p, t, s = c.train.global_batch_size, prompt_length(c), r.max_new_tokens, c.data.seq_len
    params_sh, replicated = program.state_shardings.params, sharding.replicated(mesh)
    rows_sh = sharding.batch_sharding(mesh, 2)
    out_sh = {"completion": sharding.batch_sharding(mesh, 3), "lengths": rows_sh,
              "logps": sharding.batch_sharding(mesh, 3)}
    fn = jax.jit(functools.partial(rollout, lm=lm, sampling=sampling, group_size=group,
                                   max_new=t),
                 in_shardings=(params_sh, rows_sh, rows_sh, replicated, replicated),
                 out_shardings=out_sh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (program.abstract_params,
            jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=rows_sh),
            jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=rows_sh),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
            jax.ShapeDtypeStruct((stop_width(c),), jnp.int32, sharding=replicated))
    cache = jax.eval_shape(lambda: lm.init_cache(b * group, p + t))
    cache_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache))
    flops = b * group * (p + t) * scaling.forward_flops_per_token(lm_cfg, s)
    return JitProgram(fn, args, flops=flops, per_step=not greedy, reads=("params",),
                      temporaries={"KV cache": cache_bytes})


def rollout_programs(program: Program) -> dict[str, JitProgram]:
    """An RL run's rollouts: the training one (every step) and the held-out one."""
    return {ROLLOUT: rollout_program(program, greedy=False),
            EVAL_ROLLOUT: rollout_program(program, greedy=True)}


def flat_groups(batch: dict[str, Any]) -> dict[str, Any]:
    """An update batch's [B, G, ...] arrays as [B * G, ...] rows."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def sequences(prompt_BxP: np.ndarray, valid_BxP: np.ndarray, completion_BxGxT: np.ndarray,
              lengths_BxG: np.ndarray) -> dict[str, np.ndarray]:
    """Host-side rows of prompt + completion: tokens and valid [B, G, P + T], and mask
    [B, G, T] (1 on the generated tokens)."""
    g, t = completion_BxGxT.shape[1:]
    mask_BxGxT = (np.arange(t) < lengths_BxG[..., None]).astype(np.int32)
    prompt_BxGxP = np.repeat(prompt_BxP[:, None], g, axis=1)
    pvalid_BxGxP = np.repeat(valid_BxP[:, None], g, axis=1).astype(np.int32)
    return {"tokens": np.concatenate([prompt_BxGxP, completion_BxGxT], -1).astype(np.int32),
            "valid": np.concatenate([pvalid_BxGxP, mask_BxGxT], -1),
            "mask": mask_BxGxT.astype(np.float32)}


def completion_hidden(params: Any, tokens_NxS: jax.Array, valid_NxS: jax.Array, num_new: int,
                      *, model: nn.Module, rng: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
    """The final hidden states that predict the last `num_new` slots [N, T, D], and the vocab
    head [V, D]. `model` returns hidden states (`return_hidden`), not a score head.

    The model runs over all S slots (the last one's output unused) rather than the S - 1 that
    predict, so the attention sees data.seq_len (TPU Splash needs a multiple of 128)."""
    valid = valid_NxS.astype(jnp.int32)
    positions_NxS = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    (hidden_NxSxD, head_VxD), _ = model.apply(
        {"params": params}, tokens_NxS, positions_BxL=positions_NxS, segment_ids_BxL=valid,
        return_hidden=True, mutable=["intermediates"],
        rngs=None if rng is None else {"dropout": rng})
    return hidden_NxSxD[:, -num_new - 1:-1], head_VxD


def sequence_logps(params: Any, tokens_NxS: jax.Array, valid_NxS: jax.Array, num_new: int, *,
                   model: nn.Module, with_entropy: bool = False, rng: jax.Array | None = None,
                   temperature: float = 1.0) -> jax.Array | tuple[jax.Array, jax.Array]:
    """log p(token) of the last `num_new` slots of each row [N, T] (and their entropy) under
    softmax(logits / temperature), from the chunked head (`token_logps`: no [N, S, V]
    logits)."""
    hidden_NxTxD, head_VxD = completion_hidden(params, tokens_NxS, valid_NxS, num_new,
                                               model=model, rng=rng)
    return token_logps(hidden_NxTxD, head_VxD, tokens_NxS[:, -num_new:],
                       vocab_size=model.cfg.vocab_size, with_entropy=with_entropy,
                       logit_softcap=model.cfg.final_logit_softcap, temperature=temperature)
