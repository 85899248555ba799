"""Sweeps: many runs of one config file, e.g. the IsoFLOP grid of a scaling-law fit.

    python -m jaxlm.tools.sweep --config=configs/sweeps/isoflop_tiny.py --workdir=/tmp/isoflop
    python -m jaxlm.tools.sweep --config=configs/sweeps/isoflop_tiny.py --workdir=gs://b/iso \
        --print_commands

A sweep config file defines, next to `get_config(arg=None)`, a function `get_sweep(arg=None)`
that returns (or yields) points: dicts whose dotted keys are config overrides
(`{"model.d_model": 64, "train.tokens": 10**6}`) and whose plain keys are metadata copied into
the results table (`"name"` names the point's sub-workdir `<workdir>/<name>`, default its index;
an IsoFLOP grid adds e.g. `"budget"`). Locally the points run one after another through
`jaxlm.run.trainer.run`, each in its own sub-workdir with the tokenizer/corpus cache shared in
`<workdir>/cache`; a point whose metrics.jsonl already reaches its last step is skipped, and
one that stopped midway resumes from its checkpoints. `--print_commands` prints one
`python -m jaxlm.main` command per point instead (run them anywhere, e.g. on a cluster; a later
local call then finds them finished and only collects).

After every point, `<workdir>/results.csv` holds one row per finished point: its name and
metadata, N (parameters counted as the config's `train.param_convention` says, named in the
column param_convention; default Hoffmann et al.'s Table A9 convention), N_total and
N_non_embedding (as built), D (tokens trained = steps x batch x seq), C = 6 N D and the
detailed count C_detailed, the final train loss (last
step and mean of the last 10% of logged steps) and the final eval loss. Fit it with
`python -m jaxlm.tools.fit_scaling_law --results=<workdir>/results.csv` (docs/scaling.md).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shlex
from collections.abc import Iterable
from typing import Any

import ml_collections
from absl import app, flags, logging

from jaxlm.run import config as config_lib
from jaxlm.run import errors
from jaxlm.scaling import flops as scaling

RESULTS_FIELDS = ("name", "N", "param_convention", "N_total", "N_non_embedding", "D", "C",
                  "C_detailed", "steps", "final_loss", "final_loss_avg", "eval_loss")


def load_sweep_file(spec: str) -> tuple[Any, str | None]:
    """The module of `path[:arg]` and its argument (None without a colon)."""
    path, sep, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    for fn in ("get_config", "get_sweep"):
        if not callable(getattr(module, fn, None)):
            raise ValueError(f"--config: {path} defines no {fn}(arg=None); a sweep file needs "
                             "get_config and get_sweep")
    return module, (arg if sep else None)


def split_point(point: dict[str, Any], index: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(name, overrides: dotted config keys, metadata: plain keys) of one sweep point."""
    overrides = {k: v for k, v in point.items() if "." in k}
    meta = {k: v for k, v in point.items() if "." not in k}
    name = str(meta.pop("name", f"{index:03d}"))
    if not name or "/" in name or name in (".", "..", "cache"):
        raise ValueError(f"sweep point {index}: name {name!r} cannot name a sub-workdir")
    return name, overrides, meta


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any],
                    name: str) -> ml_collections.ConfigDict:
    """A validated copy of `config` with the dotted-key `overrides`; errors name the point."""
    c = config.copy_and_resolve_references()
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = c
        try:
            for section in sections:
                node = node[section]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = value
        except (KeyError, TypeError) as e:
            raise ValueError(f"sweep point {name}: config key {key}: unknown key or bad value "
                             f"{value!r} ({e})") from e
    config_lib.validate(c)
    return c


def points(module: Any, arg: str | None) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    out = [split_point(dict(p), i) for i, p in enumerate(module.get_sweep(arg))]
    names = [name for name, _, _ in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"sweep points share the names {duplicates}; give each a unique 'name'")
    return out


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(rows: Iterable[dict[str, Any]], total_steps: int) -> dict[str, float] | None:
    """Final losses of a run from its metrics.jsonl rows; None until it reached total_steps.

    A resumed run appends again from its checkpoint, so for each step the last row counts.
    """
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for row in rows:
        if "loss" in row:
            train[row["step"]] = row["loss"]
        if "eval_loss" in row:
            evals[row["step"]] = row["eval_loss"]
    if total_steps not in train:
        return None
    tail = [loss for step, loss in train.items() if step > 0.9 * total_steps]
    return {"final_loss": train[total_steps], "final_loss_avg": sum(tail) / len(tail),
            "eval_loss": evals.get(total_steps, float("nan"))}


def sizes(config: ml_collections.ConfigDict) -> dict[str, float]:
    """N (under train.param_convention), N total and non-embedding (as built), steps, D,
    C = 6ND and C_detailed of a point's (unresolved) config.

    The vocabulary is model.vocab_size, else data.vocab_size (the tokenizer the run trains).
    """
    cfg = config_lib.model_config(config, vocab_size=config.data.vocab_size)
    params = scaling.count_params(cfg)
    convention = config.train.param_convention
    n = scaling.param_count(cfg, convention)
    steps = config_lib.resolve_steps(config, cfg).train.steps
    tokens = steps * config_lib.tokens_per_step(config)
    per_token = scaling.flops_per_token(cfg, config.data.seq_len)["train"]
    return {"N": n, "param_convention": convention, "N_total": params["total"],
            "N_non_embedding": params["non_embedding"], "steps": steps, "D": tokens,
            "C": 6.0 * n * tokens, "C_detailed": per_token * tokens}


def write_results(path: str, rows: list[dict[str, Any]]) -> None:
    meta = [k for row in rows for k in row if k not in RESULTS_FIELDS]
    fields = list(RESULTS_FIELDS[:1]) + list(dict.fromkeys(meta)) + list(RESULTS_FIELDS[1:])
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def launch_command(spec: str, workdir: str, overrides: dict[str, Any]) -> str:
    """The `python -m jaxlm.main` command of one point."""
    args = ["python", "-m", "jaxlm.main", f"--config={spec}", f"--workdir={workdir}"]
    args += [f"--config.{k}={v!r}" if isinstance(v, float) else f"--config.{k}={v}"
             for k, v in overrides.items()]
    return shlex.join(args)


def run_sweep(spec: str, workdir: str, train_fn: Any = None) -> list[dict[str, Any]]:
    """Runs (or skips, when finished) every point of the sweep file `spec` = `path[:arg]`.

    `train_fn(config, workdir)` trains one point; default `jaxlm.run.trainer.run`. Returns the rows
    of `<workdir>/results.csv`.
    """
    if train_fn is None:
        from jaxlm.run import trainer

        train_fn = trainer.run
    module, arg = load_sweep_file(spec)
    base = module.get_config(arg)
    if not base.data.cache_dir:
        base.data.cache_dir = os.path.join(workdir, "cache")  # one tokenizer for all points
    todo = points(module, arg)
    os.makedirs(workdir, exist_ok=True)
    results: list[dict[str, Any]] = []
    for i, (name, overrides, meta) in enumerate(todo):
        config = apply_overrides(base, overrides, name)
        point_dir = os.path.join(workdir, name)
        numbers = sizes(config)
        summary = summarize(read_metrics(point_dir), numbers["steps"])
        if summary is None:
            logging.info("sweep point %d/%d %s: N=%d D=%d C=%.3g %s", i + 1, len(todo), name,
                         numbers["N"], numbers["D"], numbers["C"], overrides)
            train_fn(config, point_dir)
            summary = summarize(read_metrics(point_dir), numbers["steps"])
            if summary is None:
                raise RuntimeError(f"sweep point {name}: {point_dir}/metrics.jsonl has no loss "
                                   f"at the last step {numbers['steps']} (preempted?); rerun "
                                   "the sweep to resume it")
        else:
            logging.info("sweep point %d/%d %s: finished, skipped", i + 1, len(todo), name)
        results.append({"name": name, **meta, **numbers, **summary})
        write_results(os.path.join(workdir, "results.csv"), results)
    return results


def main() -> None:
    # Flags are defined here, not at import, so that importing this module defines no flags.
    config = flags.DEFINE_string("config", None, "Sweep config file, `path[:arg]`, defining "
                                 "get_config and get_sweep.")
    workdir = flags.DEFINE_string("workdir", None, "Sweep directory: one sub-workdir per "
                                  "point and results.csv.")
    print_commands = flags.DEFINE_bool("print_commands", False, "Print one launch command per "
                                       "point instead of running them.")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if print_commands.value:
            module, arg = load_sweep_file(config.value)
            for name, overrides, _ in points(module, arg):
                print(launch_command(config.value,
                                     f"{workdir.value.rstrip('/')}/{name}", overrides))
            return
        rows = run_sweep(config.value, workdir.value)
        logging.info("%d points; results in %s", len(rows),
                     os.path.join(workdir.value, "results.csv"))

    app.run(lambda argv: errors.run_main(run, argv))


if __name__ == "__main__":
    main()
