"""An lm-evaluation-harness backend (the optional `lm-eval` package): any harness task runs on
jaxlm's sharded forward pass and KV-cache decoder.

    pip install -e '.[eval]'
    python -m jaxlm.tools.eval --workdir=RUN --tasks=hellaswag,arc_easy --batch_size=64
    python -m jaxlm.tools.eval --workdir=RUN --tasks=my_task --include_path=tasks/   # local YAML

`JaxLM` is a `TemplateLM`: the harness splits each (context, continuation) pair into token ids
with `tok_encode` exactly as for its Hugging Face backend, and jaxlm's `Engine` scores them in
length-sorted, shape-bucketed batches. Rolling log-likelihoods use the harness's own disjoint
windows; generation is greedy, cut at the request's stop strings.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from collections.abc import Iterator
from typing import Any

import yaml
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from jaxlm.evaluation.engine import Engine, Progress

DEFAULT_MAX_GEN_TOKS = 256


class JaxLM(TemplateLM):
    """lm-eval model over a jaxlm `Engine` (its params, mesh and tokenizer)."""

    def __init__(self, engine: Engine, progress: Progress | None = None):
        super().__init__()
        self.engine = engine
        self.progress = progress

    # -- tokenization (what TemplateLM needs) ------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.engine.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.engine.tokenizer.prefix_id

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    @property
    def tokenizer_name(self) -> str:
        return self.engine.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        del kwargs
        return self.engine.tokenizer.encode(string, special=add_special_tokens is not False)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.engine.tokenizer.decode(tokens)

    def _expect(self, n: int) -> None:
        add_total = getattr(self.progress, "add_total", None)
        if add_total is not None:
            add_total(n)

    # -- requests ---------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              **kwargs: Any) -> list[tuple[float, bool]]:
        del kwargs
        self._expect(len(requests))
        out = self.engine.loglikelihood([(ctx, cont) for _, ctx, cont in requests],
                                        self.progress)
        for (key, _, _), value in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, value)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        del disable_tqdm
        windows, owner = [], []
        for r, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for pair in lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1):
                windows.append((None,) + lm_utils.make_disjoint_window(pair))
                owner.append(r)
        self._expect(len(windows))
        totals = [0.0] * len(requests)  # greedy matches are not needed: not computed
        for r, (logp, _) in zip(owner, self.engine.loglikelihood(
                [(ctx, cont) for _, ctx, cont in windows], self.progress, greedy=False)):
            totals[r] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        del disable_tqdm
        eos = (self.engine.tokenizer.decode([self.eot_token_id], skip_special=False)
               if self.eot_token_id >= 0 else "")
        contexts, untils, budgets = [], [], []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            budget = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("the jaxlm harness backend generates greedily; the task asks "
                                 f"for sampling ({gen_kwargs})")
            contexts.append(self.tok_encode(context))
            untils.append(until)
            budgets.append(min(budget, self.max_length - 1))
        self._expect(len(requests))
        out = self.engine.generate_until(contexts, untils, budgets, self.progress)
        for request, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out


def evaluate(engine: Engine, tasks: list[str], *, include_path: str = "", limit: int = 0,
             num_fewshot: int | None = None, progress: Progress | None = None,
             log_samples: bool = False) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of `tasks` on the engine's model; its result dict."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=JaxLM(engine, progress), tasks=tasks, num_fewshot=num_fewshot,
                           limit=limit or None, task_manager=_task_manager(include_path,
                                                                           tuple(tasks)),
                           log_samples=log_samples, bootstrap_iters=0)


def check_tasks(tasks: list[str], include_path: str = "") -> None:
    """Refuses, in one line naming it, an --include_path that is not a directory, a task YAML
    under it that does not parse, and a task the harness does not know (with close names);
    before any checkpoint is read. Parsing runs nothing: a task folder's `!function` code is
    imported only when its task is built."""
    from jaxlm.run.errors import ConfigError

    if include_path:
        if not os.path.isdir(include_path):
            raise ConfigError(f"--include_path={include_path} is not a directory")
        for path in sorted(glob.glob(os.path.join(include_path, "**", "*.yaml"),
                                     recursive=True)):
            _check_yaml(path)
    if not tasks:
        return
    missing = _named_in_no_task_file(tasks, include_path)
    if missing:  # a quick refusal: no YAML file of the harness or under include_path names it
        _refuse_unknown(missing[0], _declared_names(include_path), include_path)
    try:
        known = set(_task_manager(include_path, tuple(tasks)).all_tasks)
    except ImportError as e:
        raise ConfigError(f"harness tasks {tasks} need the lm-eval package "
                          f"(pip install -e '.[eval]'): {e}") from None
    for task in tasks:
        if task not in known:
            _refuse_unknown(task, known, include_path)


def _refuse_unknown(task: str, known: set[str], include_path: str) -> None:
    import difflib

    from jaxlm.run.errors import ConfigError

    close = difflib.get_close_matches(task, sorted(known), n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else (
        " (a local task: give its folder with --include_path)" if not include_path
        else f" (nor is it in {include_path})")
    raise ConfigError(f"--tasks: {task!r} is neither a built-in nor a harness task{hint}")


# A task, group or tag name as a YAML file declares it (`task: name`), for close-name hints.
_DECLARED = re.compile(rb"^[ \t]*(?:task|group|tag)[ \t]*:[ \t]*['\"]?([\w.\-]+)['\"]?[ \t]*"
                       rb"(?:#.*)?$", re.M)


def _task_files(include_path: str) -> Iterator[bytes]:
    """The bytes of every YAML file of the harness's own task folders and under include_path."""
    roots = [os.path.join(os.path.dirname(lm_utils.__file__), "tasks")]
    roots += [include_path] if include_path else []
    for root in roots:
        for directory, _, files in os.walk(root):
            for name in files:
                if name.endswith((".yaml", ".yml")):
                    with open(os.path.join(directory, name), "rb") as f:
                        yield f.read()


def _named_in_no_task_file(tasks: list[str], include_path: str) -> list[str]:
    """The tasks that no task YAML file mentions anywhere: certainly unknown, since the
    harness's index takes every task, group and tag name from a YAML file. Reading the ~14k
    files takes under a second; parsing them into the index takes ~20 s."""
    missing = {t: t.encode() for t in tasks}
    for text in _task_files(include_path):
        missing = {t: b for t, b in missing.items() if b not in text}
        if not missing:
            break
    return [t for t in tasks if t in missing]


def _declared_names(include_path: str) -> set[str]:
    return {m.decode() for text in _task_files(include_path) for m in _DECLARED.findall(text)}


class _TaskYaml(yaml.SafeLoader):
    """YAML with the harness's tags (`!function ...`) read as plain values, never resolved."""


_TaskYaml.add_multi_constructor("!", lambda loader, suffix, node: None)


def _check_yaml(path: str) -> None:
    from jaxlm.run.errors import ConfigError

    try:
        with open(path, "rb") as f:
            config = yaml.load(f, Loader=_TaskYaml)  # noqa: S506  (SafeLoader, tags inert)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--include_path: {path} is not valid YAML "
                          f"({' '.join(str(e).split())})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--include_path: {path} is not a task (a YAML mapping with task: "
                          f"..., got {type(config).__name__})")


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str, tasks: tuple[str, ...]) -> Any:
    """The harness's task index, built once per process (evals during training reuse it).
    Indexing the harness's own task folders takes ~30 s, so a task list found entirely under
    include_path skips them."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include_path or None)
