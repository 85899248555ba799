"""The `eval` section of a run config: tasks run from the trainer on the live params.

Importing this module pulls in neither JAX nor lm-eval.
"""

from __future__ import annotations

import importlib.util

import ml_collections

from jaxlm.run.errors import ConfigError

BUILTIN_TASKS = ("builtin", "corpus_bpb", "next_line", "line_completion")


def default_eval_config() -> ml_collections.ConfigDict:
    """The `eval` section with its defaults."""
    e = ml_collections.ConfigDict()
    # Comma-separated tasks run on the live params during training: "builtin" (every built-in
    # offline eval), corpus_bpb, next_line, line_completion, or lm-evaluation-harness task
    # names (needs the `eval` extra). "" = none. Results go to metrics.jsonl and TensorBoard
    # as eval/<task>/<metric> and to <workdir>/eval/results_step<N>.json.
    e.tasks = ""
    # Run them every this many steps (0: only at the end of the run).
    e.every_steps = 0
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
    for key, low in (("every_steps", 0), ("limit", 0), ("batch_size", 1), ("num_fewshot", -1)):
        if e[key] < low:
            raise ConfigError(f"config key eval.{key}: must be >= {low}, got {e[key]}")
    names = [t.strip() for t in e.tasks.split(",") if t.strip()]
    harness = [t for t in names if t not in BUILTIN_TASKS]
    if harness and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"config key eval.tasks: {harness} are lm-evaluation-harness tasks, "
                         "which need the lm-eval package: pip install -e '.[eval]'")
