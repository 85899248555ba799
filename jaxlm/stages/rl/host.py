"""What the RL stages do on the host around their jitted pieces: generate, decode, score.

`RolloutHost` is built once per run from the Program (`Stage.make_host`). It jits the rollout
(`jaxlm.stages.rl.rollout.rollout`) with the policy's training shardings, turns completions into
text, scores them with the configured rewards, evaluates greedy decoding on held-out prompts, counts
the FLOPs of generation and training separately, and places host arrays back on the mesh.
Each stage (grpo, rejection, ppo) adds its own `train`, and a stage whose host carries
values from step to step (ppo's adaptive KL coefficient) its `host_state` / `load_host_state`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxlm.data.config import split_list
from jaxlm.inference import decode
from jaxlm.inference.processing import SamplingParams, as_arrays
from jaxlm.parallel import hardware, sharding
from jaxlm.run.errors import ConfigError
from jaxlm.scaling import flops as scaling
from jaxlm.stages.rl.prompts import prompt_length
from jaxlm.stages.rl.rewards import correct, total_reward
from jaxlm.stages.rl.rollout import rollout
from jaxlm.stages.rl.settings import parse_weights
from jaxlm.stages.rl.tasks import split_examples


def stop_ids(tokenizer: Any, stop: str) -> list[int]:
    """EOS plus the single-token pieces of `stop` (comma-separated)."""
    ids = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", -1) >= 0 else []
    for piece in split_list(stop.encode().decode("unicode_escape")):
        encoded = list(tokenizer.encode(piece))
        if len(encoded) != 1:
            raise ConfigError(f"config key rl.stop: {piece!r} is {len(encoded)} tokens, not one")
        ids.append(encoded[0])
    return ids


def place(arrays: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Global host arrays (the same on every process) as arrays sharded over the batch axes."""
    return {k: jax.make_array_from_callback(v.shape, sharding.batch_sharding(mesh, v.ndim),
                                            lambda idx, v=v: v[idx])
            for k, v in arrays.items()}


class RolloutHost:
    """Rollouts, rewards, held-out evaluation and FLOP counts of one RL run."""

    def __init__(self, program: Any, tokenizer: Any):
        c = program.config
        self.program, self.config, self.tokenizer, self.mesh = program, c, tokenizer, program.mesh
        self.weights = parse_weights(c.rl.rewards)
        self.examples = {"train": split_examples(c, "train")}
        self.pad_id = max(getattr(tokenizer, "pad_id", 0), 0)
        self.stop = stop_ids(tokenizer, c.rl.stop)
        self.max_new = c.rl.max_new_tokens
        self.samples: list[str] = []
        # A policy with a value head (ppo) decodes with its vocab head.
        lm = decode.TransformerLM(dataclasses.replace(program.model_cfg, reward_head=False))
        out_sh = {"completion": sharding.batch_sharding(self.mesh, 3),
                  "lengths": sharding.batch_sharding(self.mesh, 2),
                  "logps": sharding.batch_sharding(self.mesh, 3)}
        self._rollout = jax.jit(
            functools.partial(rollout, lm=lm, max_new=self.max_new, pad_id=self.pad_id),
            static_argnames=("group_size",), out_shardings=out_sh)
        self.sampling = as_arrays(SamplingParams(temperature=c.rl.temperature, top_p=c.rl.top_p,
                                                 top_k=c.rl.top_k))
        self.greedy = as_arrays(SamplingParams())
        self.peak = hardware.peak_flops_per_device(jax.devices()[0], c.model.compute_dtype,
                                                   override=c.log.peak_flops or None)[0]
        cfg, s = program.model_cfg, c.data.seq_len
        lora = bool(c.model.lora.rank)
        self.train_flops_per_token = scaling.train_flops_per_token(cfg, s, frozen_base=lora)
        self.forward_flops_per_token = (
            scaling.train_flops_per_token(cfg, s, frozen_base=lora, reference_forwards=1)
            - self.train_flops_per_token)

    # -- state that outlives a step ----------------------------------------------------------

    def host_state(self) -> dict[str, Any]:
        """What the host carries from step to step, as a JSON-serialisable dict: the trainer
        saves it with every checkpoint (taken after the checkpointed step) and hands it to
        `load_host_state` on resume. Stateless hosts keep the default: nothing."""
        return {}

    def load_host_state(self, state: dict[str, Any]) -> None:
        """Continues from `host_state()` as a checkpoint saved it."""
        del state

    def example(self, split: str, i: int) -> dict:
        if split not in self.examples:
            self.examples[split] = split_examples(self.config, split)
        return self.examples[split][i]

    # -- generation and scoring -----------------------------------------------------------

    def generate(self, params: Any, host_batch: dict[str, np.ndarray], *, group_size: int,
                 rng: jax.Array, greedy: bool = False) -> dict[str, np.ndarray]:
        """The global batch's prompts and their completions, as host arrays on every process:
        prompt, prompt_valid [B, P], example_id [B], completion, logps [B, G, T], lengths
        [B, G], and `seconds` (wall time, waited for)."""
        t0 = time.perf_counter()
        gb = sharding.global_batch(host_batch, self.mesh)
        stop = jax.device_put(np.asarray(self.stop or [-1], np.int32),
                              sharding.replicated(self.mesh))
        with sharding.activate(self.mesh):
            out = self._rollout(params, gb["prompt"], gb["prompt_valid"], rng,
                                self.greedy if greedy else self.sampling, stop,
                                group_size=group_size)
        host = multihost_utils.process_allgather({**gb, **out}, tiled=True)
        host = {k: np.asarray(v) for k, v in host.items()}
        host["seconds"] = time.perf_counter() - t0
        return host

    def texts(self, rolled: dict[str, np.ndarray], split: str
              ) -> tuple[list[str], list[list[str]], list[dict]]:
        """Prompt texts [B], completion texts [B][G] (stop token cut) and examples [B]."""
        examples = [self.example(split, int(i)) for i in rolled["example_id"]]
        completions = []
        for row, lengths in zip(rolled["completion"], rolled["lengths"]):
            texts = []
            for ids, n in zip(row, lengths):
                ids = [int(t) for t in ids[:int(n)]]
                if ids and ids[-1] in self.stop:
                    ids = ids[:-1]
                texts.append(self.tokenizer.decode(ids))
            completions.append(texts)
        return [e["prompt"] for e in examples], completions, examples

    def rewards(self, rolled: dict[str, np.ndarray], split: str
                ) -> tuple[np.ndarray, dict[str, np.ndarray], list[str], list[list[str]]]:
        """Rewards [B, G], each named reward's values [B, G], and the texts scored."""
        prompts, completions, examples = self.texts(rolled, split)
        b, g = rolled["lengths"].shape
        total = np.zeros((b, g), np.float32)
        parts = {name: np.zeros((b, g), np.float32) for name, _ in self.weights}
        for i in range(b):
            for j in range(g):
                total[i, j], values = total_reward(self.weights, prompts[i], completions[i][j],
                                                   examples[i])
                for name, v in values.items():
                    parts[name][i, j] = v
        return total, parts, prompts, completions

    def rollout_rng(self, step: int) -> jax.Array:
        """The rollout key of a step: the same in a resumed run."""
        return jax.random.fold_in(jax.random.key(self.config.seed + 1), step)

    # -- a training step ---------------------------------------------------------------------

    def train_rollout(self, state: Any, host_batch: dict[str, np.ndarray]
                      ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
        """rl.group_size completions of each training prompt from the policy in `state`, drawn
        with the step's rollout key, and their rewards [B, G] and named rewards' values [B, G]."""
        step = int(jax.device_get(state.step))
        rolled = self.generate(state.params, host_batch, group_size=self.config.rl.group_size,
                               rng=self.rollout_rng(step))
        rewards, parts, _, _ = self.rewards(rolled, "train")
        return rolled, rewards, parts

    def update(self, state: Any, arrays: dict[str, np.ndarray], *reference: Any
               ) -> tuple[Any, dict[str, float]]:
        """The Program's jitted train step on host `arrays` placed over the mesh; metrics read
        back as floats."""
        state, metrics = self.program.train_step(state, place(arrays, self.mesh), *reference)
        return state, {k: float(v) for k, v in jax.device_get(metrics).items()}

    # -- evaluation ----------------------------------------------------------------------

    def eval(self, params: Any, host_batch: dict[str, np.ndarray], reference: Any = None
             ) -> dict[str, float]:
        """Greedy completions of held-out prompts: summed reward, exact answers and lengths."""
        del reference
        rolled = self.generate(params, host_batch, group_size=1, rng=jax.random.key(0),
                               greedy=True)
        rewards, _, prompts, completions = self.rewards(rolled, "eval")
        examples = [self.example("eval", int(i)) for i in rolled["example_id"]]
        hits = [correct(p, c[0], e) for p, c, e in zip(prompts, completions, examples)]
        self.samples = [f"{p!r} -> {c[0]!r} (reward {r[0]:.3f})" for p, c, r in
                        zip(prompts, completions, rewards)][:self.config.rl.log_samples]
        for line in self.samples:
            logging.info("sample: %s", line)
        return {"reward_sum": float(rewards.sum()), "correct_sum": float(sum(hits)),
                "count": float(rewards.size), "length_sum": float(rolled["lengths"].sum())}

    # -- throughput ------------------------------------------------------------------------

    def throughput(self, rolled: dict[str, np.ndarray], update_rows: int, update_passes: float,
                   rollout_s: float, update_s: float, step_s: float) -> dict[str, float]:
        """Generation and training throughput and MFU, each counted on its own work.

        Generation: every row runs the prompt's P tokens (prefill) and one token per decode
        iteration (the loop runs until its longest completion ends), at the forward FLOPs of
        a token of data.seq_len context. Training: `update_passes` full passes (forward and
        backward: 1 per epoch; a frozen reference forward its share of one) over `update_rows`
        rows of data.seq_len - 1 tokens.
        """
        n_dev = jax.device_count()
        b, g = rolled["lengths"].shape
        generated = float(rolled["lengths"].sum())
        loop_tokens = b * g * (prompt_length(self.config) + int(rolled["lengths"].max()))
        rollout_flops = loop_tokens * self.forward_flops_per_token
        train_tokens = update_rows * (self.config.data.seq_len - 1)
        update_flops = train_tokens * update_passes * self.train_flops_per_token
        mfu = lambda f, s: hardware.mfu(f, max(s, 1e-9), n_dev, self.peak)  # noqa: E731
        return {"rollout_tokens_per_sec": generated / max(rollout_s, 1e-9),
                "tokens_per_sec": train_tokens / max(update_s, 1e-9),
                "rollout_fraction": rollout_s / max(step_s, 1e-9),
                "rollout_mfu": mfu(rollout_flops, rollout_s),
                "train_mfu": mfu(update_flops, update_s),
                "mfu": mfu(rollout_flops + update_flops, step_s),
                "rollout_seconds": rollout_s, "step_seconds": step_s}


def eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    n = max(totals.get("count", 0.0), 1.0)
    return {"eval_reward_mean": totals.get("reward_sum", 0.0) / n,
            "eval_accuracy": totals.get("correct_sum", 0.0) / n,
            "eval_response_length": totals.get("length_sum", 0.0) / n}
