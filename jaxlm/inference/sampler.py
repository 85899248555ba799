"""The host-side sampler: requests in, completions out, on a device mesh like training's.

`Sampler` pads a batch of requests (left-padding to a length bucket, so few programs compile),
places them over the mesh's data axes, and runs the jitted loops of `jaxlm.inference.decode` and
`jaxlm.inference.speculative` with the params sharded as in training (heads and MLP over
`tensor`, the batch and the KV cache's batch over `data`/`fsdp`, kv heads over `tensor`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlm.inference import decode, scoring, speculative
from jaxlm.inference.processing import SamplingParams, as_arrays
from jaxlm.models import ModelConfig, Transformer
from jaxlm.parallel import sharding
from jaxlm.run.train_state import abstract_boxed_params


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt (token ids) with its own budget and stop tokens."""

    prompt: Sequence[int]
    max_new_tokens: int = 32
    stop_tokens: Sequence[int] = ()


@dataclasses.dataclass
class Completion:
    """New tokens (ending with the stop token if one was hit), their total model log-prob
    (sampling) or beam score, and whether a stop token ended them."""

    tokens: list[int]
    score: float
    stopped: bool


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Any:
    """NamedShardings of the params by their logical axis names (the training layout)."""
    return sharding.logical_shardings(abstract_boxed_params(Transformer(cfg), 1), mesh)


def shard_params(cfg: ModelConfig, params: Any, mesh: Mesh) -> Any:
    return jax.device_put(params, param_shardings(cfg, mesh))


class Sampler:
    """Generation, beam search, best-of-N, speculative decoding and scoring for one model.

    `params` are used as given: put them on `mesh` first (`shard_params`, or restore them
    sharded). `pad_id` fills padding and finished rows; `bucket` rounds prompt and generation
    lengths up so that nearby sizes share a compiled program.
    """

    def __init__(self, cfg: ModelConfig, params: Any, *, mesh: Mesh | None = None,
                 pad_id: int = 0, bucket: int = 16):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.pad_id, self.bucket = pad_id, bucket
        self.lm = decode.TransformerLM(cfg)
        self.last_acceptance_rate: float | None = None

    # -- batching ---------------------------------------------------------------------------

    def _context(self):
        return sharding.activate(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        spec = sharding.logical_to_mesh_spec(("act_batch",) + (None,) * (x.ndim - 1), x.shape,
                                             dict(self.mesh.shape))
        return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

    def _batch(self, requests: Sequence[Request], extra_len: int = 0) -> dict[str, Any]:
        if not requests:
            raise ValueError("no requests")
        for r in requests:
            if not len(r.prompt):
                raise ValueError("a request has an empty prompt; start it with BOS at least")
            if r.max_new_tokens < 0:
                raise ValueError(f"max_new_tokens must be >= 0, got {r.max_new_tokens}")
        length = _bucket(max(len(r.prompt) for r in requests), self.bucket)
        max_new = _bucket(max(r.max_new_tokens for r in requests), self.bucket)
        if (self.cfg.position_embedding == "learned"
                and max(len(r.prompt) + r.max_new_tokens for r in requests) > self.cfg.max_seq_len):
            raise ValueError(f"prompt + max_new_tokens exceeds the model's learned position "
                             f"table of {self.cfg.max_seq_len}")
        stops = _bucket(max(len(r.stop_tokens) for r in requests), 4)
        tokens = np.full((len(requests), length), self.pad_id, np.int32)
        valid = np.zeros((len(requests), length), bool)
        stop = np.full((len(requests), stops), -1, np.int32)
        for i, r in enumerate(requests):
            tokens[i, length - len(r.prompt):] = r.prompt
            valid[i, length - len(r.prompt):] = True
            stop[i, :len(r.stop_tokens)] = r.stop_tokens
        budget = np.asarray([r.max_new_tokens for r in requests], np.int32)
        return dict(tokens=self._put(tokens), valid=self._put(valid), budget=self._put(budget),
                    stop=self._put(stop), max_new=max_new)

    def _completions(self, tokens: np.ndarray, lengths: np.ndarray, scores: np.ndarray,
                     requests: Sequence[Request]) -> list[Completion]:
        out = []
        for toks, n, score, r in zip(tokens, lengths, scores, requests):
            new = [int(t) for t in toks[:int(n)]]
            out.append(Completion(new, float(score), bool(new) and new[-1] in r.stop_tokens))
        return out

    # -- generation -------------------------------------------------------------------------

    @functools.cached_property
    def _sample_fn(self):
        return jax.jit(functools.partial(decode.sample, self.lm, pad_id=self.pad_id),
                       static_argnames=("max_new",))

    def generate(self, requests: Sequence[Request], sampling: SamplingParams | None = None,
                 seed: int = 0) -> list[Completion]:
        """One completion per request (greedy when sampling.temperature == 0, the default)."""
        sampling = sampling or SamplingParams()
        sampling.check()
        batch = self._batch(requests)
        with self._context():
            out = self._sample_fn(self.params, batch["tokens"], batch["valid"], batch["budget"],
                                  batch["stop"], as_arrays(sampling), jax.random.key(seed),
                                  max_new=batch["max_new"])
        out = jax.device_get(out)
        return self._completions(out["tokens"], out["lengths"], out["logprob"], requests)

    def best_of(self, requests: Sequence[Request], n: int,
                sampling: SamplingParams | None = None, seed: int = 0) -> list[Completion]:
        """Samples n completions per request (default: temperature 1); returns the one of
        highest total log-prob."""
        sampling = sampling or SamplingParams(temperature=1.0)
        if n < 1:
            raise ValueError(f"best_of n must be >= 1, got {n}")
        samples = self.generate([r for r in requests for _ in range(n)], sampling, seed)
        return [max(samples[i * n:(i + 1) * n], key=lambda c: c.score)
                for i in range(len(requests))]

    @functools.cached_property
    def _beam_fn(self):
        return jax.jit(functools.partial(decode.beam_search, self.lm, pad_id=self.pad_id),
                       static_argnames=("beams", "max_new", "length_penalty",
                                        "early_stopping"))

    def beam_search(self, requests: Sequence[Request], beams: int, length_penalty: float = 1.0,
                    early_stopping: bool | str = False) -> list[list[Completion]]:
        """The `beams` best finished hypotheses per request, best first, with the semantics
        (and defaults) of transformers' beam search: score = logprob / length**length_penalty,
        early_stopping True / False / "never" (see `decode.beam_search`)."""
        if beams < 1:
            raise ValueError(f"beams must be >= 1, got {beams}")
        if early_stopping not in decode.EARLY_STOPPING:
            raise ValueError(f"early_stopping must be one of {decode.EARLY_STOPPING}, got "
                             f"{early_stopping!r}")
        batch = self._batch(requests)
        with self._context():
            out = self._beam_fn(self.params, batch["tokens"], batch["valid"], batch["budget"],
                                batch["stop"], beams=beams, max_new=batch["max_new"],
                                length_penalty=float(length_penalty),
                                early_stopping=early_stopping)
        out = jax.device_get(out)
        return [self._completions(out["tokens"][i], out["lengths"][i], out["scores"][i],
                                  [r] * beams) for i, r in enumerate(requests)]

    def speculative(self, requests: Sequence[Request], draft_cfg: ModelConfig, draft_params: Any,
                    num_draft: int = 4, sampling: SamplingParams | None = None,
                    seed: int = 0) -> list[Completion]:
        """Completions of this (target) model, proposed by a draft model: distributed exactly as
        `generate` with the same `sampling` (greedy by default) would give them
        (`speculative.speculative_decode`).

        Sets `last_acceptance_rate` (accepted / proposed draft tokens).
        """
        sampling = sampling or SamplingParams()
        sampling.check()
        if draft_cfg.padded_vocab_size != self.cfg.padded_vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft_cfg.vocab_size}) differs "
                             f"from the target's ({self.cfg.vocab_size})")
        if num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {num_draft}")
        batch = self._batch(requests)
        fn = _speculative_fn(self.cfg, draft_cfg, self.pad_id)
        with self._context():
            out = fn(self.params, draft_params, batch["tokens"], batch["valid"], batch["budget"],
                     batch["stop"], as_arrays(sampling), jax.random.key(seed),
                     num_draft=num_draft, max_new=batch["max_new"])
        out = jax.device_get(out)
        self.last_acceptance_rate = float(out["accepted"]) / max(float(out["proposed"]), 1.0)
        return self._completions(out["tokens"], out["lengths"], np.zeros(len(requests)),
                                 requests)

    # -- scoring ----------------------------------------------------------------------------

    @functools.cached_property
    def _score_fn(self):
        return jax.jit(functools.partial(scoring.token_logprobs, Transformer(self.cfg)))

    def score(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """log p(t_i | t_<i) for i >= 1 of each token sequence (len - 1 values each)."""
        length = _bucket(max(len(s) for s in sequences), self.bucket)
        if self.cfg.position_embedding == "learned" and length > self.cfg.max_seq_len:
            length = max(len(s) for s in sequences)
            if length > self.cfg.max_seq_len:
                raise ValueError(f"a sequence of {length} tokens exceeds the model's learned "
                                 f"position table of {self.cfg.max_seq_len}")
        tokens = np.full((len(sequences), length), self.pad_id, np.int32)
        valid = np.zeros((len(sequences), length), bool)
        for i, s in enumerate(sequences):
            tokens[i, :len(s)], valid[i, :len(s)] = s, True
        with self._context():
            logp = jax.device_get(self._score_fn(self.params, self._put(tokens),
                                                 self._put(valid)))
        return [logp[i, :max(len(s) - 1, 0)] for i, s in enumerate(sequences)]


@functools.lru_cache(maxsize=8)
def _speculative_fn(target_cfg: ModelConfig, draft_cfg: ModelConfig, pad_id: int):
    target, draft = decode.TransformerLM(target_cfg), decode.TransformerLM(draft_cfg)

    def run(target_params, draft_params, *arrays, num_draft, max_new):
        return speculative.speculative_decode(target, target_params, draft, draft_params,
                                              *arrays, num_draft=num_draft, max_new=max_new,
                                              pad_id=pad_id)

    return jax.jit(run, static_argnames=("num_draft", "max_new"))


__all__ = ["Completion", "Request", "Sampler", "SamplingParams", "param_shardings",
           "shard_params"]
