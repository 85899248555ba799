"""Prefill + autoregressive decoding with a KV cache: sampling and beam search loops.

The loops are pure functions of arrays with static shapes, meant to run under one `jax.jit`:
prompts arrive left-padded to a common length P (so every row's last prompt token sits in slot
P-1 and all rows share one cache write index), with a validity mask; row positions count only
the real tokens, so a padded prompt decodes exactly like the same prompt alone.

A language model is anything with `init_cache(batch, max_len)` and
`step(params, cache, tokens_BxL, positions_BxL, valid_BxL) -> (logits_BxLxV, cache)`;
`TransformerLM` wraps `jaxlm.models.Transformer`.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxlm.inference.processing import SamplingParams, choose
from jaxlm.models import ModelConfig, Transformer, kv_cache


class LanguageModel(Protocol):
    def init_cache(self, batch: int, max_len: int) -> Any: ...

    def step(self, params: Any, cache: Any, tokens_BxL: jax.Array, positions_BxL: jax.Array,
             valid_BxL: jax.Array) -> tuple[jax.Array, Any]: ...


class TransformerLM:
    """`jaxlm.models.Transformer` in decode mode: each step appends to the KV cache."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.model = Transformer(cfg, decode=True)

    def init_cache(self, batch: int, max_len: int) -> Any:
        return kv_cache.init_cache(self.model, batch, max_len)

    def step(self, params, cache, tokens_BxL, positions_BxL, valid_BxL):
        logits_BxLxV, variables = self.model.apply(
            {"params": params, "cache": cache}, tokens_BxL, positions_BxL,
            valid_BxL.astype(jnp.int32), mutable=["cache"])
        return logits_BxLxV, variables["cache"]


def prompt_positions(valid_BxP: jax.Array) -> jax.Array:
    """Positions of left-padded prompts: 0, 1, ... from each row's first real token."""
    return jnp.maximum(jnp.cumsum(valid_BxP.astype(jnp.int32), axis=1) - 1, 0)


def prefill(lm: LanguageModel, params: Any, tokens_BxP: jax.Array, valid_BxP: jax.Array,
            cache_len: int) -> tuple[jax.Array, Any, jax.Array]:
    """Runs the prompts; returns (logits after the last prompt token [B, V], cache, next
    position of each row)."""
    cache = lm.init_cache(tokens_BxP.shape[0], cache_len)
    logits_BxPxV, cache = lm.step(params, cache, tokens_BxP, prompt_positions(valid_BxP),
                                  valid_BxP)
    return logits_BxPxV[:, -1], cache, jnp.sum(valid_BxP, axis=1, dtype=jnp.int32)


def hits_stop(tokens_B: jax.Array, stop_BxS: jax.Array) -> jax.Array:
    """Whether each row's token is one of its stop tokens (stop lists padded with -1)."""
    return jnp.any(tokens_B[:, None] == stop_BxS, axis=-1)


def _seen(tokens_BxP: jax.Array, valid_BxP: jax.Array, vocab: int) -> jax.Array:
    one_hot = jax.nn.one_hot(tokens_BxP, vocab, dtype=jnp.bool_) & valid_BxP[..., None]
    return jnp.any(one_hot, axis=1)


def sample(lm: LanguageModel, params: Any, tokens_BxP: jax.Array, valid_BxP: jax.Array,
           max_new_B: jax.Array, stop_BxS: jax.Array, sampling: SamplingParams,
           rng: jax.Array, *, max_new: int, pad_id: int) -> dict[str, jax.Array]:
    """Samples (or greedily decodes) up to max_new_B[b] <= max_new tokens per row.

    A row stops after one of its stop tokens (which is kept in its output) or its budget;
    later entries are pad_id. Returns tokens [B, max_new], lengths [B], logprob [B], the
    sum of the model's (unfiltered) log-probabilities of the chosen tokens, and token_logprob
    [B, max_new], each chosen token's own (0 after the end; what RL keeps of its rollouts).
    """
    b = tokens_BxP.shape[0]
    last_BxV, cache, pos_B = prefill(lm, params, tokens_BxP, valid_BxP,
                                     tokens_BxP.shape[1] + max_new)
    state = dict(i=jnp.zeros((), jnp.int32), last=last_BxV, cache=cache, pos=pos_B,
                 out=jnp.full((b, max_new), pad_id, jnp.int32),
                 lengths=jnp.zeros((b,), jnp.int32), logprob=jnp.zeros((b,), jnp.float32),
                 token_logprob=jnp.zeros((b, max_new), jnp.float32), done=max_new_B <= 0,
                 seen=_seen(tokens_BxP, valid_BxP, last_BxV.shape[-1]),
                 rng=rng)

    def cond(s):
        return (s["i"] < max_new) & ~jnp.all(s["done"])

    def body(s):
        rng, key = jax.random.split(s["rng"])
        done, i = s["done"], s["i"]
        tok_B = choose(key, s["last"], s["seen"], sampling)
        logp_B = jnp.take_along_axis(jax.nn.log_softmax(s["last"]), tok_B[:, None], 1)[:, 0]
        tok_B = jnp.where(done, pad_id, tok_B)
        logits_Bx1xV, cache = lm.step(params, s["cache"], tok_B[:, None], s["pos"][:, None],
                                      ~done[:, None])
        return dict(i=i + 1, last=logits_Bx1xV[:, 0], cache=cache,
                    pos=s["pos"] + ~done, out=s["out"].at[:, i].set(tok_B),
                    lengths=jnp.where(done, s["lengths"], i + 1),
                    logprob=s["logprob"] + jnp.where(done, 0.0, logp_B),
                    token_logprob=s["token_logprob"].at[:, i].set(jnp.where(done, 0.0, logp_B)),
                    done=done | hits_stop(tok_B, stop_BxS) | (i + 1 >= max_new_B),
                    seen=s["seen"] | (jax.nn.one_hot(tok_B, s["seen"].shape[-1], dtype=jnp.bool_)
                                      & ~done[:, None]),
                    rng=rng)

    s = jax.lax.while_loop(cond, body, state)
    return {"tokens": s["out"], "lengths": s["lengths"], "logprob": s["logprob"],
            "token_logprob": s["token_logprob"]}


def beam_search(lm: LanguageModel, params: Any, tokens_BxP: jax.Array, valid_BxP: jax.Array,
                max_new_B: jax.Array, stop_BxS: jax.Array, *, beams: int, max_new: int,
                pad_id: int, length_penalty: float = 0.0) -> dict[str, jax.Array]:
    """Keeps the `beams` highest-scoring continuations of each prompt; score = sum of log-probs.

    A beam that emits a stop token (or reaches its budget) is finished: it stays in the beam set
    with its score frozen (it can only be extended by pad at log-prob 0). Returns tokens
    [B, W, max_new], lengths [B, W] and scores [B, W], best first, where the ranking score is
    logprob / length**length_penalty (0: plain sum of log-probs).
    """
    b, w = tokens_BxP.shape[0], beams
    rep = lambda x: jnp.repeat(x, w, axis=0)  # noqa: E731
    tokens_BxP, valid_BxP, max_new_B, stop_BxS = map(rep, (tokens_BxP, valid_BxP, max_new_B,
                                                           stop_BxS))
    last_BxV, cache, pos_B = prefill(lm, params, tokens_BxP, valid_BxP,
                                     tokens_BxP.shape[1] + max_new)
    vocab = last_BxV.shape[-1]
    scores_BxW = jnp.tile(jnp.where(jnp.arange(w) == 0, 0.0, -jnp.inf), (b, 1))
    state = dict(i=jnp.zeros((), jnp.int32), last=last_BxV, cache=cache, pos=pos_B,
                 out=jnp.full((b * w, max_new), pad_id, jnp.int32),
                 lengths=jnp.zeros((b * w,), jnp.int32), scores=scores_BxW,
                 done=max_new_B <= 0)
    pad_only_V = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)

    def cond(s):
        return (s["i"] < max_new) & ~jnp.all(s["done"])

    def body(s):
        i = s["i"]
        logp_BxWxV = jax.nn.log_softmax(s["last"]).reshape(b, w, vocab)
        logp_BxWxV = jnp.where(s["done"].reshape(b, w, 1), pad_only_V, logp_BxWxV)
        cand_BxWV = (s["scores"][..., None] + logp_BxWxV).reshape(b, w * vocab)
        scores_BxW, idx_BxW = jax.lax.top_k(cand_BxWV, w)
        rows_R = (jnp.arange(b)[:, None] * w + idx_BxW // vocab).reshape(-1)
        tok_R = (idx_BxW % vocab).reshape(-1).astype(jnp.int32)
        done, pos = s["done"][rows_R], s["pos"][rows_R]
        lengths = jnp.where(done, s["lengths"][rows_R], i + 1)
        cache = kv_cache.reorder(s["cache"], rows_R)
        logits_Rx1xV, cache = lm.step(params, cache, tok_R[:, None], pos[:, None],
                                      ~done[:, None])
        return dict(i=i + 1, last=logits_Rx1xV[:, 0], cache=cache, pos=pos + ~done,
                    out=s["out"][rows_R].at[:, i].set(tok_R), lengths=lengths,
                    scores=scores_BxW,
                    done=done | hits_stop(tok_R, stop_BxS) | (i + 1 >= max_new_B))

    s = jax.lax.while_loop(cond, body, state)
    lengths_BxW = s["lengths"].reshape(b, w)
    rank_BxW = s["scores"] / jnp.maximum(lengths_BxW, 1).astype(jnp.float32) ** length_penalty
    order_BxW = jnp.argsort(-rank_BxW, axis=-1)
    take = lambda x: jnp.take_along_axis(x, order_BxW.reshape(  # noqa: E731
        (b, w) + (1,) * (x.ndim - 2)), axis=1)
    return {"tokens": take(s["out"].reshape(b, w, max_new)), "lengths": take(lengths_BxW),
            "scores": take(s["scores"])}
