"""The `eval` section of a run config: when a run evaluates, on how much held-out data, and
which tasks run from the trainer on the live params.

Importing this module pulls in neither JAX nor lm-eval.
"""

from __future__ import annotations

import importlib.util

import ml_collections

from jaxlm.run.errors import ConfigError
from jaxlm.run.section import Section

BUILTIN_TASKS = ("builtin", "corpus_bpb", "next_line", "line_completion")


def default_eval_config() -> ml_collections.ConfigDict:
    """The `eval` section with its defaults."""
    e = ml_collections.ConfigDict()
    # Evaluate every this many steps (0: only at the last step): the held-out loss (or the RL
    # stages' held-out rewards) and eval.tasks.
    e.every_steps = 200
    # Held-out tokens per evaluation of the token stages (pretrain, sft, distill): a fixed
    # sample of the held-out split (docs/data.md); 0 = no held-out evaluation.
    e.tokens = 32768
    # Held-out examples per evaluation of the pair and RL stages (dpo, reward: pairs; grpo, ppo,
    # rejection: prompts), rounded up to whole batches; 0 = no held-out evaluation.
    e.examples = 64
    # Comma-separated tasks run on the live params during training: "builtin" (every built-in
    # offline eval), corpus_bpb, next_line, line_completion, or lm-evaluation-harness task
    # names (needs the `eval` extra). "" = none. Results go to metrics.jsonl and TensorBoard
    # as eval/<task>/<metric> and to <workdir>/eval/results_step<N>.json.
    e.tasks = ""
    # Examples per task at most (0: the built-in defaults; every example of a harness task).
    e.limit = 0
    # Requests per batch (rounded up to a multiple of the data-parallel devices).
    e.batch_size = 16
    # Folder of harness task YAML files (local tasks, no download).
    e.include_path = ""
    # Few-shot examples of harness tasks; -1 = each task's own.
    e.num_fewshot = -1
    return e


def check_eval_config(e: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `eval.*` key that is wrong."""
    for key, low in (("every_steps", 0), ("tokens", 0), ("examples", 0), ("limit", 0),
                     ("batch_size", 1), ("num_fewshot", -1)):
        if e[key] < low:
            raise ConfigError(f"config key eval.{key}: must be >= {low}, got {e[key]}")
    names = [t.strip() for t in e.tasks.split(",") if t.strip()]
    harness = [t for t in names if t not in BUILTIN_TASKS]
    if harness and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"config key eval.tasks: {harness} are lm-evaluation-harness tasks, "
                         "which need the lm-eval package: pip install -e '.[eval]'")


def check_eval(config: ml_collections.ConfigDict) -> None:
    check_eval_config(config.eval)


EVAL = Section("eval", default_eval_config, check_eval)
