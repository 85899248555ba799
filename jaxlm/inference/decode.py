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
           rng: jax.Array, *, max_new: int, pad_id: int,
           tempered_logprobs: bool = False) -> dict[str, jax.Array]:
    """Samples (or greedily decodes) up to max_new_B[b] <= max_new tokens per row.

    A row stops after one of its stop tokens (which is kept in its output) or its budget;
    later entries are pad_id. Returns tokens [B, max_new], lengths [B], logprob [B], the
    sum of the model's (unfiltered) log-probabilities of the chosen tokens, and token_logprob
    [B, max_new], each chosen token's own (0 after the end; what RL keeps of its rollouts).
    tempered_logprobs: those log-probabilities are of softmax(logits / temperature), the
    distribution sampled before top-k / top-p (at temperature 0, of the model's own).
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

    scale = jnp.where(sampling.temperature > 0, sampling.temperature, 1.0) \
        if tempered_logprobs else 1.0

    def body(s):
        rng, key = jax.random.split(s["rng"])
        done, i = s["done"], s["i"]
        tok_B = choose(key, s["last"], s["seen"], sampling)
        logp_B = jnp.take_along_axis(jax.nn.log_softmax(s["last"] / scale), tok_B[:, None],
                                     1)[:, 0]
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


EARLY_STOPPING = (False, True, "never")
_NEG = -1.0e9  # the score of a beam that must not be chosen (finite, so sums stay ordered)


def beam_search(lm: LanguageModel, params: Any, tokens_BxP: jax.Array, valid_BxP: jax.Array,
                max_new_B: jax.Array, stop_BxS: jax.Array, *, beams: int, max_new: int,
                pad_id: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False) -> dict[str, jax.Array]:
    """Beam search with the semantics of `transformers`' `generate(num_beams=...)`.

    Each step extends the `beams` open beams of a prompt by every token and ranks the
    candidates by their summed log-prob; of the top max(2, 1 + S) x beams (S = stop-list width):
      * a candidate that ends (a stop token, or the row's budget reached) and ranks among the
        first `beams` becomes a finished hypothesis, scored logprob / length ** length_penalty
        with length = its new tokens, the stop token included; it replaces the worst of the
        `beams` kept finished hypotheses if it scores higher;
      * the best `beams` candidates that do not end are the next open beams, so finished ones
        never take an open beam's slot.
    A prompt is done when its budget is reached; or, with `early_stopping=True`, as soon as it
    has `beams` finished hypotheses; or, with False / "never", when those are all at least as
    good as the best open beam could still get (its score at the current length, or, for
    "never" with length_penalty > 0, at the full budget). Returns the finished hypotheses:
    tokens [B, W, max_new] (pad after their end), lengths [B, W] and scores [B, W], best first
    (a row with a budget of 0 has none: lengths 0, scores 0).
    """
    if early_stopping not in EARLY_STOPPING:
        raise ValueError(f"early_stopping must be one of {EARLY_STOPPING}, got "
                         f"{early_stopping!r}")
    b, w, s_width = tokens_BxP.shape[0], beams, stop_BxS.shape[1]
    rep = lambda x: jnp.repeat(x, w, axis=0)  # noqa: E731
    last, cache, pos = prefill(lm, params, rep(tokens_BxP), rep(valid_BxP),
                               tokens_BxP.shape[1] + max_new)
    vocab = last.shape[-1]
    k = min(max(2, 1 + s_width) * w, w * vocab)
    state = dict(i=jnp.zeros((), jnp.int32), last=last, cache=cache, pos=pos,
                 run_out=jnp.full((b, w, max_new), pad_id, jnp.int32),
                 run_scores=jnp.tile(jnp.where(jnp.arange(w) == 0, 0.0, _NEG), (b, 1)),
                 fin_out=jnp.full((b, w, max_new), pad_id, jnp.int32),
                 fin_scores=jnp.full((b, w), -jnp.inf, jnp.float32),
                 fin_lengths=jnp.zeros((b, w), jnp.int32), open=max_new_B > 0)

    def gather(x, idx_BxN):  # x [B, M, ...] -> [B, N, ...]
        return jnp.take_along_axis(x, idx_BxN.reshape(idx_BxN.shape + (1,) * (x.ndim - 2)),
                                   axis=1)

    def cond(s):
        return (s["i"] < max_new) & jnp.any(s["open"])

    def body(s):
        i = s["i"]
        logp_BxWxV = jax.nn.log_softmax(s["last"].astype(jnp.float32)).reshape(b, w, vocab)
        cand_BxWV = (s["run_scores"][..., None] + logp_BxWxV).reshape(b, w * vocab)
        top_BxK, idx_BxK = jax.lax.top_k(cand_BxWV, k)
        src_BxK, tok_BxK = idx_BxK // vocab, (idx_BxK % vocab).astype(jnp.int32)
        out_BxKxT = gather(s["run_out"], src_BxK).at[:, :, i].set(tok_BxK)
        ends_BxK = (jnp.any(tok_BxK[..., None] == stop_BxS[:, None, :], axis=-1)
                    | (i + 1 >= max_new_B)[:, None])
        # Open beams: the best candidates that do not end.
        run_scores, keep_BxW = jax.lax.top_k(jnp.where(ends_BxK, top_BxK + _NEG, top_BxK), w)
        run_out = gather(out_BxKxT, keep_BxW)
        rows_R = (jnp.arange(b)[:, None] * w + gather(src_BxK, keep_BxW)).reshape(-1)
        tok_R = gather(tok_BxK, keep_BxW).reshape(-1)
        # Finished hypotheses: the ending candidates among the first `beams`, while the row is
        # open and (early_stopping=True) not yet full.
        full_B = jnp.all(jnp.isfinite(s["fin_scores"]), axis=-1)
        accept_B = s["open"] & ~(full_B & (early_stopping is True))
        new_BxK = ends_BxK & (jnp.arange(k) < w)[None] & accept_B[:, None]
        length = (i + 1).astype(jnp.float32)
        new_scores = jnp.where(new_BxK, top_BxK / length ** length_penalty, -jnp.inf)
        merged = jnp.concatenate([s["fin_scores"], new_scores], axis=1)
        fin_scores, best_BxW = jax.lax.top_k(merged, w)
        fin_out = gather(jnp.concatenate([s["fin_out"], out_BxKxT], axis=1), best_BxW)
        fin_lengths = gather(jnp.concatenate(
            [s["fin_lengths"], jnp.full((b, k), i + 1, jnp.int32)], axis=1), best_BxW)
        # Can the best open beam still beat the worst finished hypothesis?
        if early_stopping == "never" and length_penalty > 0:
            best_len_B = max_new_B.astype(jnp.float32)
        else:
            best_len_B = jnp.broadcast_to(length, (b,))
        full_B = jnp.all(jnp.isfinite(fin_scores), axis=-1)
        improvable_B = ~full_B | (run_scores[:, 0] / best_len_B ** length_penalty
                                  > jnp.min(fin_scores, axis=-1))
        still_open = s["open"] & improvable_B & (i + 1 < max_new_B)
        if early_stopping is True:
            still_open &= ~full_B
        cache = kv_cache.reorder(s["cache"], rows_R)
        pos = s["pos"][rows_R]
        logits_Rx1xV, cache = lm.step(params, cache, tok_R[:, None], pos[:, None],
                                      jnp.ones((b * w, 1), bool))
        return dict(i=i + 1, last=logits_Rx1xV[:, 0], cache=cache, pos=pos + 1,
                    run_out=run_out, run_scores=run_scores, fin_out=fin_out,
                    fin_scores=fin_scores, fin_lengths=fin_lengths, open=still_open)

    s = jax.lax.while_loop(cond, body, state)
    found = jnp.isfinite(s["fin_scores"])
    return {"tokens": jnp.where(found[..., None], s["fin_out"], pad_id),
            "lengths": jnp.where(found, s["fin_lengths"], 0),
            "scores": jnp.where(found, s["fin_scores"], 0.0)}
