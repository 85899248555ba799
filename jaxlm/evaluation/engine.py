"""The evaluation engine: log-likelihoods, rolling log-likelihoods and greedy generation of
token-level requests, batched on the model's mesh.

Requests are sorted by length and cut into batches of exactly `batch_size` rows (short batches
are filled with one-token rows), each padded to a power-of-two length (capped at the model's
`max_length`), so a whole evaluation compiles a handful of programs. Log-probabilities come from
the one chunked per-token path (`jaxlm.losses.cross_entropy.token_logps`), so no [B, L, V] array is
built;
greedy generation is `jaxlm.inference.Sampler`'s KV-cache decoder.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxlm.evaluation.target import TextTokenizer
from jaxlm.inference.sampler import Request, Sampler
from jaxlm.losses.cross_entropy import token_logps
from jaxlm.models import ModelConfig, Transformer
from jaxlm.models.softcap import softcap
from jaxlm.parallel import sharding

MIN_BUCKET = 16
Progress = Callable[[int], None]


def length_bucket(n: int, cap: int) -> int:
    """The padded length of an n-token row: the next power of two >= MIN_BUCKET, at most cap."""
    return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), max(cap, n))


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int
                    ) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows that score every token of a long text once.

    The first window predicts tokens[:max_length] from the prefix token; each later window
    predicts the next max_length tokens (fewer at the end) from as many preceding tokens as fit,
    so the model always sees up to max_length tokens. The continuations concatenate to `tokens`.
    """
    tokens = list(tokens)
    out: list[tuple[list[int], list[int]]] = []
    done = 0
    while done < len(tokens):
        end = min(done + max_length, len(tokens))
        window = ([prefix_id] + tokens)[max(0, end - max_length):end + 1]
        cont = tokens[done:end]
        out.append((window[:len(window) - len(cont)], cont))
        done = end
    return out


def bits_per_byte(nll_sum: float, num_bytes: int) -> float:
    """Total negative log-likelihood (nats) of a text in bits per UTF-8 byte."""
    return nll_sum / (max(num_bytes, 1) * math.log(2))


@dataclasses.dataclass
class Throughput:
    """Requests and tokens processed, and the seconds they took."""

    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, requests: int, tokens: int, seconds: float) -> None:
        self.requests += requests
        self.tokens += tokens
        self.seconds += seconds

    def summary(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {"requests": self.requests, "tokens": self.tokens, "seconds": self.seconds,
                "requests_per_sec": self.requests / s, "tokens_per_sec": self.tokens / s}


def _score(model: nn.Module, params: Any, inputs_BxL: jax.Array, targets_BxL: jax.Array,
           valid_BxL: jax.Array, last_B: jax.Array, *, greedy_len: int
           ) -> tuple[jax.Array, jax.Array]:
    """log p(targets) [B, L] (0 on padding) and the argmax tokens [B, K] at the K positions
    ending at each row's last real input (index last_B), K = greedy_len."""
    hidden_BxLxD, head_VxD = model.apply({"params": params}, inputs_BxL,
                                         segment_ids_BxL=valid_BxL.astype(jnp.int32),
                                         return_hidden=True)
    logp_BxL = token_logps(hidden_BxLxD, head_VxD, targets_BxL, vocab_size=model.cfg.vocab_size,
                           logit_softcap=model.cfg.final_logit_softcap)
    logp_BxL = jnp.where(valid_BxL, logp_BxL, 0.0)
    idx_BxK = jnp.clip(last_B[:, None] - greedy_len + 1 + jnp.arange(greedy_len), 0,
                       inputs_BxL.shape[1] - 1)
    h_BxKxD = jnp.take_along_axis(hidden_BxLxD, idx_BxK[..., None], axis=1)
    logits_BxKxV = jnp.einsum("bkd,vd->bkv", h_BxKxD, head_VxD).astype(jnp.float32)
    # argmax ties where the cap saturates in float32 are broken as the model's own logits do
    logits_BxKxV = softcap(logits_BxKxV, model.cfg.final_logit_softcap)
    logits_BxKxV = jnp.where(jnp.arange(head_VxD.shape[0]) < model.cfg.vocab_size,
                             logits_BxKxV, -jnp.inf)
    return logp_BxL, jnp.argmax(logits_BxKxV, axis=-1).astype(jnp.int32)


class Engine:
    """Scores and generates for one model on `mesh` with its tokenizer.

    Assign `params` to evaluate other params of the same model (e.g. the live training params):
    the compiled programs are kept.
    """

    def __init__(self, model_cfg: ModelConfig, params: Any, tokenizer: TextTokenizer,
                 mesh: Mesh, *, batch_size: int = 16, max_length: int = 0):
        rows = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        self.batch_size = -(-max(batch_size, 1) // rows) * rows
        self.cfg, self.tokenizer, self.mesh = model_cfg, tokenizer, mesh
        self.max_length = min(max_length or model_cfg.max_seq_len, model_cfg.max_seq_len)
        self.model = Transformer(model_cfg)
        self.sampler = Sampler(model_cfg, params, mesh=mesh, pad_id=tokenizer.pad_id)
        self.throughput = Throughput()

    @property
    def params(self) -> Any:
        return self.sampler.params

    @params.setter
    def params(self, value: Any) -> None:
        self.sampler.params = value

    @functools.cached_property
    def _score_fn(self):
        return jax.jit(functools.partial(_score, self.model), static_argnames=("greedy_len",))

    def _put(self, x: np.ndarray) -> jax.Array:
        spec = sharding.logical_to_mesh_spec(("act_batch",) + (None,) * (x.ndim - 1), x.shape,
                                             dict(self.mesh.shape))
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    # -- log-likelihood ---------------------------------------------------------------------

    def loglikelihood(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                      progress: Progress | None = None) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding yields the continuation)
        per (context ids, continuation ids); contexts are cut on the left to fit max_length."""
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("a log-likelihood request has an empty continuation")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((whole, min(len(cont), len(whole) - 1)))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for batch in self._batches([len(w) for w, _ in rows]):
            t0 = time.perf_counter()
            length = length_bucket(max(len(rows[i][0]) - 1 for i in batch), self.max_length)
            k = length_bucket(max(rows[i][1] for i in batch), length)
            b = self.batch_size
            inputs = np.full((b, length), self.tokenizer.pad_id, np.int32)
            targets = np.zeros((b, length), np.int32)
            valid = np.zeros((b, length), bool)
            valid[:, 0] = True  # filler rows: one token
            last = np.zeros((b,), np.int32)
            for r, i in enumerate(batch):
                whole = rows[i][0]
                n = len(whole) - 1
                inputs[r, :n], targets[r, :n], valid[r, :n] = whole[:-1], whole[1:], True
                last[r] = n - 1
            with sharding.activate(self.mesh):
                logp, greedy = jax.device_get(self._score_fn(
                    self.params, self._put(inputs), self._put(targets), self._put(valid),
                    self._put(last), greedy_len=k))
            scored = 0
            for r, i in enumerate(batch):
                whole, c = rows[i]
                n = len(whole) - 1
                total = float(np.sum(logp[r, n - c:n], dtype=np.float64))
                out[i] = (total, bool(np.all(greedy[r, k - c:] == np.asarray(whole[-c:]))))
                scored += c
            self.throughput.add(len(batch), scored, time.perf_counter() - t0)
            if progress is not None:
                progress(len(batch))
        return out

    def loglikelihood_rolling(self, docs: Sequence[Sequence[int]],
                              progress: Progress | None = None) -> list[float]:
        """Total log p of each whole token sequence, in disjoint windows of max_length."""
        windows, owner = [], []
        for d, tokens in enumerate(docs):
            for w in rolling_windows(tokens, self.tokenizer.prefix_id, self.max_length):
                windows.append(w)
                owner.append(d)
        totals = [0.0] * len(docs)
        for d, (logp, _) in zip(owner, self.loglikelihood(windows)):
            totals[d] += logp
        if progress is not None:
            progress(len(docs))
        return totals

    # -- generation -------------------------------------------------------------------------

    def _stop_ids(self, until: Sequence[str]) -> tuple[int, ...]:
        """EOS and every stop string that is exactly one token: decoding stops there early
        (text is cut at the stop strings anyway)."""
        ids = [self.tokenizer.eos_id] if self.tokenizer.eos_id >= 0 else []
        for s in until:
            enc = self.tokenizer.encode(s, special=False)
            if len(enc) == 1 and self.tokenizer.decode(enc, skip_special=False) == s:
                ids.append(enc[0])
        return tuple(dict.fromkeys(ids))

    def generate_until(self, contexts: Sequence[Sequence[int]], until: Sequence[Sequence[str]],
                       max_new_tokens: Sequence[int], progress: Progress | None = None
                       ) -> list[str]:
        """Greedy continuation text of each context, cut before the first of its stop strings
        (and at EOS), at most max_new_tokens tokens."""
        out = [""] * len(contexts)
        prompts = []
        for ctx, new in zip(contexts, max_new_tokens):
            keep = max(self.max_length - new, 1)
            prompts.append(list(ctx)[-keep:] or [self.tokenizer.prefix_id])
        for batch in self._batches([len(p) for p in prompts]):
            t0 = time.perf_counter()
            requests = [Request(prompts[i], max_new_tokens[i], self._stop_ids(until[i]))
                        for i in batch]
            filler = Request([self.tokenizer.prefix_id], 0, ())
            done = self.sampler.generate(requests + [filler] * (self.batch_size - len(batch)))
            generated = 0
            for i, completion in zip(batch, done):
                tokens = completion.tokens
                if tokens and tokens[-1] == self.tokenizer.eos_id:
                    tokens = tokens[:-1]
                generated += len(completion.tokens)
                out[i] = cut_at_stop(self.tokenizer.decode(tokens), until[i])
            self.throughput.add(len(batch), generated, time.perf_counter() - t0)
            if progress is not None:
                progress(len(batch))
        return out


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in until:
        if s:
            at = text.find(s)
            if at >= 0:
                cut = min(cut, at)
    return text[:cut]
