"""Evals during training: the `eval` tasks on the live params, with the run's mesh and tokenizer.

The engine's programs are separate from the train step (which the trainer compiled ahead of
time), are compiled at the first evaluation and reused by every later one; the params are
read, never copied or donated, and results are on the host before the next train step is
dispatched, so an evaluation adds its own compute and nothing else.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from absl import logging

from jaxlm.evaluation import builtin
from jaxlm.evaluation import results as results_lib
from jaxlm.evaluation.engine import Engine
from jaxlm.evaluation.target import TextTokenizer


class LiveEval:
    """Runs config.eval.tasks every eval.every_steps steps (and at the end) of a run."""

    def __init__(self, config: Any, program: Any, tokenizer: Any, mesh: Any, workdir: str,
                 cache_dir: str):
        self.config, self.workdir = config, workdir
        # The built-in tasks read the run's own held-out split (from the run's cache).
        self.heldout = builtin.HeldOut.of_run(config.data, cache_dir)
        text = TextTokenizer(tokenizer, add_bos=bool(config.data.add_bos),
                             name=getattr(tokenizer, "path", ""))
        self.engine = Engine(program.model_cfg, None, text, mesh,
                             batch_size=config.eval.batch_size)

    @classmethod
    def maybe(cls, s: Any) -> LiveEval | None:
        """The run's live eval, or None when config.eval.tasks is empty."""
        if not s.config.eval.tasks:
            return None
        return cls(s.config, s.program, s.tokenizer, s.mesh, s.workdir, s.cache_dir)

    def due(self, step: int, total_steps: int) -> bool:
        every = self.config.eval.every_steps
        return step == total_steps or bool(every and step % every == 0)

    def run(self, params: Any, step: int) -> dict[str, Any]:
        """The tasks' results on `params`; the flat eval/<task>/<metric> values are logged."""
        e = self.config.eval
        self.engine.params = params
        try:
            out = results_lib.run_tasks(self.engine, e.tasks, limit=e.limit,
                                        include_path=e.include_path,
                                        num_fewshot=None if e.num_fewshot < 0 else e.num_fewshot,
                                        progress=False, heldout=self.heldout)
        finally:
            self.engine.params = None
        out["checkpoint"] = {"directory": os.path.join(self.workdir, "checkpoints"),
                             "step": step, "live": True}
        out["config"] = self.config.to_dict()
        if jax.process_index() == 0 and "://" not in self.workdir:
            results_lib.write_results(out, results_lib.default_path(self.workdir, step))
        logging.info("evals at step %d:\n%s", step, results_lib.format_table(out))
        return out

    def metrics(self, out: dict[str, Any]) -> dict[str, float]:
        tp = out["throughput"]
        return {**results_lib.flat_metrics(out), "eval/requests_per_sec": tp["requests_per_sec"],
                "eval/tokens_per_sec": tp["tokens_per_sec"]}
