"""The RL stages' step loop: generate with the Program's rollout, score on the host, update.

`RolloutLoop` is the `jaxlm.stages.loop.StepLoop` of grpo, rejection and ppo, built once per run
by `Program.make_loop`. Every jitted piece it runs is the Program's (built by `program.build`,
so the fit check compiles them and MFU counts them): the rollout programs
(`jaxlm.stages.rl.rollout.rollout_programs`) and the train step. Between them it turns
completions into text, scores them with the configured rewards, evaluates greedy decoding on
held-out prompts and places host arrays back on the mesh. Each stage (grpo, rejection, ppo)
adds its own `train`, and a stage whose loop carries values from step to step (ppo's adaptive
KL coefficient) its `host_state` / `load_host_state`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxlm.data import chat
from jaxlm.data.config import split_list
from jaxlm.data.tasks import split_examples
from jaxlm.parallel import sharding
from jaxlm.run.errors import ConfigError
from jaxlm.stages.rl.prompts import prompt_template
from jaxlm.stages.rl.rewards import correct, total_reward
from jaxlm.stages.rl.rollout import EVAL_ROLLOUT, ROLLOUT, stop_width
from jaxlm.stages.rl.settings import parse_weights

if TYPE_CHECKING:
    from jaxlm.run.program import Program


def stop_ids(tokenizer: Any, stop: str, template: chat.ChatTemplate | None = None
             ) -> list[int]:
    """EOS, the chat template's turn_end (chat prompts: the answer's end), and the
    single-token pieces of `stop` (comma-separated)."""
    ids = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", -1) >= 0 else []
    if template is not None and not template.from_tokenizer:
        ids.append(chat.special_ids(tokenizer, template)[1])
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


def reward_metrics(rewards_BxG: np.ndarray, parts: dict[str, np.ndarray],
                   lengths_BxG: np.ndarray) -> dict[str, float]:
    """Batch means of a step's rewards, each named reward and the completions' lengths."""
    return {"reward_mean": float(rewards_BxG.mean()), "reward_std": float(rewards_BxG.std()),
            **{f"reward_{k}": float(v.mean()) for k, v in parts.items()},
            "response_length": float(lengths_BxG.mean())}


class RolloutLoop:
    """Rollouts, rewards, updates and held-out evaluation of one RL run (the train step of each
    stage in its subclass). step_args: the train step's arguments after the batch."""

    def __init__(self, program: Program, tokenizer: Any, step_args: tuple[Any, ...] = ()):
        c = program.config
        self.program, self.config, self.tokenizer, self.mesh = program, c, tokenizer, program.mesh
        self.step_args = step_args
        self.weights = parse_weights(c.rl.rewards)
        self.examples = {"train": split_examples(c, "train")}
        self.stop = stop_ids(tokenizer, c.rl.stop, prompt_template(c))
        padded = np.full(stop_width(c), -1, np.int32)
        padded[:len(self.stop)] = self.stop
        self._stop_S = jax.device_put(padded, sharding.replicated(self.mesh))
        self._samples: list[str] = []
        self._train: Any = None

    # -- state that outlives a step ----------------------------------------------------------

    def host_state(self) -> dict[str, Any]:
        """Nothing by default (see `StepLoop.host_state`)."""
        return {}

    def load_host_state(self, state: dict[str, Any]) -> None:
        del state

    def samples(self) -> list[str]:
        """The evaluation's first rl.log_samples (prompt, completion, reward) lines, logged to
        the console here; the next evaluation collects new ones."""
        out, self._samples = self._samples, []
        for line in out:
            logging.info("sample: %s", line)
        return out

    def example(self, split: str, i: int) -> dict:
        if split not in self.examples:
            self.examples[split] = split_examples(self.config, split)
        return self.examples[split][i]

    # -- generation and scoring -----------------------------------------------------------

    def generate(self, params: Any, host_batch: dict[str, np.ndarray], *, rng: jax.Array,
                 greedy: bool = False) -> dict[str, np.ndarray]:
        """The global batch's prompts and their completions (rl.group_size sampled, or one
        greedy), as host arrays on every process: prompt, prompt_valid [B, P], example_id [B],
        completion, logps [B, G, T], lengths [B, G], and `seconds` (wall time, waited for)."""
        t0 = time.perf_counter()
        gb = sharding.global_batch(host_batch, self.mesh)
        program = self.program.programs[EVAL_ROLLOUT if greedy else ROLLOUT]
        with sharding.activate(self.mesh):
            out = program(params, gb["prompt"], gb["prompt_valid"], rng, self._stop_S)
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
        rolled = self.generate(state.params, host_batch, rng=self.rollout_rng(step))
        rewards, parts, _, _ = self.rewards(rolled, "train")
        return rolled, rewards, parts

    def compile(self) -> None:
        """The train step, compiled ahead (the rollouts compile at their first call)."""
        if self._train is None:
            self._train = self.program.compile_train()

    def update(self, state: Any, arrays: dict[str, np.ndarray]) -> tuple[Any, dict[str, float]]:
        """The Program's train step on host `arrays` placed over the mesh; metrics read back
        as floats."""
        self.compile()
        state, metrics = self._train(state, place(arrays, self.mesh), *self.step_args)
        return state, {k: float(v) for k, v in jax.device_get(metrics).items()}

    @staticmethod
    def rollout_metrics(rolled: dict[str, np.ndarray], step_s: float) -> dict[str, float]:
        """Generation apart from the step: generated tokens per second of rollout time, the
        rollout's share of the step's time, and that time (MFU and tokens/s of the whole step
        are the trainer's, from the Program's FLOPs and tokens)."""
        rollout_s = rolled["seconds"]
        return {"rollout_tokens_per_sec": float(rolled["lengths"].sum()) / max(rollout_s, 1e-9),
                "rollout_fraction": rollout_s / max(step_s, 1e-9),
                "rollout_seconds": rollout_s}

    # -- evaluation ----------------------------------------------------------------------

    def eval(self, params: Any, host_batch: dict[str, np.ndarray]) -> dict[str, float]:
        """Greedy completions of held-out prompts: summed reward, exact answers and lengths."""
        return self.eval_rollout(params, host_batch)[1]

    def eval_rollout(self, params: Any, host_batch: dict[str, np.ndarray]
                     ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """`eval`'s greedy rollout of the held-out prompts and its sums (a stage that scores
        the completions further, ppo's reward model, adds its own sums)."""
        rolled = self.generate(params, host_batch, rng=jax.random.key(0), greedy=True)
        rewards, _, prompts, completions = self.rewards(rolled, "eval")
        examples = [self.example("eval", int(i)) for i in rolled["example_id"]]
        hits = [correct(p, c[0], e) for p, c, e in zip(prompts, completions, examples)]
        room = self.config.rl.log_samples - len(self._samples)
        self._samples += [f"{p!r} -> {c[0]!r} (reward {r[0]:.3f})" for p, c, r in
                          zip(prompts, completions, rewards)][:max(room, 0)]
        return rolled, {"reward_sum": float(rewards.sum()), "correct_sum": float(sum(hits)),
                        "count": float(rewards.size),
                        "length_sum": float(rolled["lengths"].sum())}


def eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    n = max(totals.get("count", 0.0), 1.0)
    return {"eval_reward_mean": totals.get("reward_sum", 0.0) / n,
            "eval_accuracy": totals.get("correct_sum", 0.0) / n,
            "eval_response_length": totals.get("length_sum", 0.0) / n}
