"""The evaluation engine: log-likelihoods, rolling log-likelihoods and greedy generation of
token-level requests, batched on the model's mesh.

Scoring requests are packed: each request's tokens are one segment of a row (positions from 0,
attending only to itself), rows are filled first-fit with the longest requests first and cut
to a power-of-two length, and batches of `batch_size` rows are dispatched while the previous
one is read back (`jaxlm.inference.scoring.pack`, `packed_logprobs`). So short requests share
rows instead of padding them, a whole evaluation compiles one program per row length, and the
numbers equal scoring each request alone. Log-probabilities come from the chunked per-token
path (no [B, L, V] array); whether greedy decoding yields a continuation is read off the same
chunks. Greedy generation is `jaxlm.inference.Sampler`'s KV-cache decoder, in length-sorted
batches of `batch_size` requests.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxlm.evaluation.target import TextTokenizer
from jaxlm.inference import scoring
from jaxlm.inference.sampler import Request, Sampler
from jaxlm.models import ModelConfig, Transformer
from jaxlm.parallel import sharding

Progress = Callable[[int], None]
# Batches dispatched ahead of the one being read back.
_IN_FLIGHT = 2


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
        return jax.jit(functools.partial(scoring.packed_logprobs, self.model),
                       static_argnames=("greedy",))

    def _put(self, x: np.ndarray) -> jax.Array:
        spec = sharding.logical_to_mesh_spec(("act_batch",) + (None,) * (x.ndim - 1), x.shape,
                                             dict(self.mesh.shape))
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    # -- log-likelihood ---------------------------------------------------------------------

    def loglikelihood(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                      progress: Progress | None = None, *, greedy: bool = True
                      ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding yields the continuation)
        per (context ids, continuation ids); contexts are cut on the left to fit max_length.
        With greedy=False the second value is always False (and not computed)."""
        t0 = time.perf_counter()
        sequences, scored = [], []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("a log-likelihood request has an empty continuation")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            sequences.append((whole[:-1], whole[1:]))
            scored.append(min(len(cont), len(whole) - 1))
        # A request with nothing to condition on (no context, one token) scores nothing.
        out: list[tuple[float, bool]] = [(0.0, greedy)] * len(pairs)
        todo = [i for i, (x, _) in enumerate(sequences) if x]
        batches = scoring.pack([len(sequences[i][0]) for i in todo], num_rows=self.batch_size,
                               max_len=self.max_length)
        in_flight: collections.deque = collections.deque()

        def read_back() -> None:
            batch, result = in_flight.popleft()
            logp, hits = jax.device_get(result)
            done = 0
            for r, row in enumerate(batch.placed):
                for k, start in row:
                    i = todo[k]
                    end = start + len(sequences[i][0])
                    first = end - scored[i]
                    total = float(np.sum(logp[r, first:end], dtype=np.float64))
                    out[i] = (total, bool(greedy and np.all(hits[r, first:end])))
                    done += 1
            if progress is not None:
                progress(done)

        with sharding.activate(self.mesh):
            for batch in batches:
                arrays = batch.arrays([sequences[i] for i in todo], self.tokenizer.pad_id)
                result = self._score_fn(self.params, *(self._put(arrays[k]) for k in (
                    "inputs", "targets", "positions", "segment_ids")), greedy=greedy)
                in_flight.append((batch, result))
                if len(in_flight) > _IN_FLIGHT:
                    read_back()
            while in_flight:
                read_back()
        self.throughput.add(len(pairs), sum(scored), time.perf_counter() - t0)
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
        for d, (logp, _) in zip(owner, self.loglikelihood(windows, greedy=False)):
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
