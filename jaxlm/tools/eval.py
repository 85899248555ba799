"""Evaluate a checkpoint: built-in offline evals, any lm-evaluation-harness task, win rates.

    python -m jaxlm.tools.eval --workdir=/tmp/jaxlm_tiny --tasks=builtin          # offline, CPU
    python -m jaxlm.tools.eval --workdir=/ckpt/llama2 --tasks=hellaswag,arc_easy --batch_size=64
    python -m jaxlm.tools.eval --workdir=RUN --tasks=my_task --include_path=my_tasks/  # local YAML
    python -m jaxlm.tools.eval --workdir=DPO_RUN --reward_model=RM_RUN               # win rate

The checkpoint is picked as by `python -m jaxlm.tools.generate` (--workdir, --step). A table goes to
stdout and the results (harness layout, plus the run config, checkpoint step and throughput) to
<workdir>/eval/results_step<N>.json (or --output). Flags only; `run(options)` does the work.
The flags and the task list (every name known, every YAML under --include_path parsed) are
checked before the checkpoint is read. A task folder is code: lm-eval imports the Python files
its YAML names with `!function` when the task is built, so give --include_path only folders you
would run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import IO, Any

from absl import app, flags

from jaxlm.run import errors


@dataclasses.dataclass
class Options:
    workdir: str
    step: int = -1
    tasks: str = "builtin"
    batch_size: int = 16
    limit: int = 0
    include_path: str = ""
    num_fewshot: int = -1
    max_length: int = 0
    tensor: int = 1
    hf_tokenizer: str = ""
    output: str = ""
    reward_model: str = ""
    reference: str = ""
    max_new_tokens: int = 64
    kv_cache: str = ""
    progress: bool = True
    quantize: str = ""
    quant_tile_size: int = 0


def _define_flags() -> None:
    d = Options.__dataclass_fields__
    flags.DEFINE_string("workdir", None, "Run directory (or its checkpoints/ directory).")
    flags.DEFINE_integer("step", d["step"].default, "Checkpoint step; -1 = the newest.")
    flags.DEFINE_string("tasks", d["tasks"].default, "Comma-separated tasks: builtin (every "
                        "built-in eval), corpus_bpb, next_line, line_completion, or harness "
                        "task names; empty with --reward_model.")
    flags.DEFINE_integer("batch_size", d["batch_size"].default, "Rows per batch: rows of "
                         "packed scoring requests, or requests decoded at once.")
    flags.DEFINE_integer("limit", 0, "Examples per task at most (0 = built-in defaults / all).")
    flags.DEFINE_string("include_path", "", "Folder of harness task YAML files (code: its "
                        "!function entries import Python files from it).")
    flags.DEFINE_integer("num_fewshot", -1, "Harness few-shot examples; -1 = the task's.")
    flags.DEFINE_integer("max_length", 0, "Context length; 0 = the model's max_seq_len.")
    flags.DEFINE_integer("tensor", 1, "Tensor-parallel mesh size (heads over devices).")
    flags.DEFINE_string("hf_tokenizer", "", "A Hugging Face tokenizer directory to use instead "
                        "of the checkpoint's (default for imports without tokenizer.model).")
    flags.DEFINE_string("output", "", "Results JSON; default <workdir>/eval/results_step<N>.json")
    flags.DEFINE_string("reward_model", "", "Reward-model run: report the win rate of this "
                        "checkpoint against its reference on held-out prompts.")
    flags.DEFINE_string("reference", "", "Reference run of --reward_model; default the "
                        "checkpoint's init_from.")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt for --reward_model.")
    flags.DEFINE_string("kv_cache", "", "KV cache of generation: int8 or compute (the compute "
                        "dtype); empty = the run's model.kv_cache_dtype.")
    flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
    flags.DEFINE_string("quantize", "", "Quantize the weights after loading: int8, int4, nf4 "
                        "or int8_dynamic (docs/quantization.md); '' = as stored.")
    flags.DEFINE_integer("quant_tile_size", 0, "--quantize: inputs per scale (0 = per "
                         "output channel).")


def _options_from_flags() -> Options:
    return Options(**{f.name: flags.FLAGS[f.name].value
                      for f in dataclasses.fields(Options)})


def check_options(opts: Options) -> None:
    """Refuses, naming the flag, a bad option or an unknown task; before anything is loaded."""
    from jaxlm.evaluation.results import split_tasks
    from jaxlm.models.kv_cache import KV_CACHE_FLAG
    from jaxlm.models.quant.spec import from_preset

    if not opts.tasks and not opts.reward_model:
        raise errors.ConfigError("give --tasks and/or --reward_model")
    for flag, value in (("batch_size", opts.batch_size), ("tensor", opts.tensor),
                        ("max_new_tokens", opts.max_new_tokens)):
        if value < 1:
            raise errors.ConfigError(f"--{flag}={value}: must be >= 1")
    if opts.kv_cache and opts.kv_cache not in KV_CACHE_FLAG:
        raise errors.ConfigError(f"--kv_cache={opts.kv_cache!r} is not one of "
                                 f"{list(KV_CACHE_FLAG)}")
    if opts.quantize:
        from_preset(opts.quantize, opts.quant_tile_size)
    _, harness_tasks = split_tasks(opts.tasks)
    if harness_tasks or opts.include_path:
        try:
            from jaxlm.evaluation import harness
        except ImportError as e:
            raise errors.ConfigError(f"harness tasks {harness_tasks} need the lm-eval package "
                                     f"(pip install -e '.[eval]'): {e}") from None
        harness.check_tasks(harness_tasks, opts.include_path)


def _cache_dir(config: Any, checkpoints: str) -> str:
    """Where the built-in tasks find (or build) the stdlib corpus: the run's data.cache_dir,
    else its <workdir>/cache when there is one (the trainer's), else ~/.cache/jaxlm."""
    from jaxlm.data import cache

    run_cache = os.path.join(os.path.dirname(checkpoints.rstrip("/")), "cache")
    return config.data.cache_dir or (run_cache if os.path.isdir(run_cache)
                                     else cache.default_cache_dir())


def run(opts: Options, stdout: IO[str] = sys.stdout) -> dict[str, Any]:
    """Evaluates the checkpoint; prints a table, writes the results JSON, returns the results."""
    from jaxlm.evaluation import builtin
    from jaxlm.evaluation import results as results_lib
    from jaxlm.evaluation.engine import Engine
    from jaxlm.evaluation.target import load_target
    from jaxlm.models.kv_cache import with_kv_cache
    from jaxlm.parallel import sharding

    check_options(opts)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": opts.tensor, "pipeline": 1})
    target = load_target(opts.workdir, None if opts.step < 0 else opts.step, mesh,
                         opts.hf_tokenizer)
    target.model_cfg = with_kv_cache(target.model_cfg, opts.kv_cache)
    if opts.quantize:
        from jaxlm.models.quant.convert import quantize_loaded

        target = quantize_loaded(target, opts.quantize, opts.quant_tile_size, mesh)
    engine = Engine(target.model_cfg, target.params, target.tokenizer, mesh,
                    batch_size=opts.batch_size, max_length=opts.max_length)
    out: dict[str, Any] = {"results": {}}
    if opts.tasks:
        out = results_lib.run_tasks(
            engine, opts.tasks, limit=opts.limit, include_path=opts.include_path,
            num_fewshot=None if opts.num_fewshot < 0 else opts.num_fewshot,
            progress=opts.progress, heldout=builtin.HeldOut.of_run(
                target.config.data, _cache_dir(target.config, target.directory)))
    if opts.reward_model:
        from jaxlm.evaluation import winrate

        out["results"]["winrate"] = winrate.evaluate(
            target, engine, opts.reward_model, reference=opts.reference,
            limit=opts.limit, max_new_tokens=opts.max_new_tokens)
    out["config"] = target.config.to_dict()
    out["checkpoint"] = {"directory": target.directory, "step": target.step,
                         "tokenizer": target.tokenizer.name}
    out["model_name"] = opts.workdir
    path = opts.output or results_lib.default_path(opts.workdir, target.step)
    results_lib.write_results(out, path)
    print(results_lib.format_table(out), file=stdout)
    print(f"results: {path}", file=stdout)
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxlm.run import console

    with console.quiet(None):  # orbax's restore lines and jax's backend probing stay quiet
        errors.run_main(lambda: run(_options_from_flags()))


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
