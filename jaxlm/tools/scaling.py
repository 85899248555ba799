"""Parameter and FLOP counts of a run config, without initialising anything.

    python -m jaxlm.tools.scaling count --config=configs/chinchilla_1b.py
    python -m jaxlm.tools.scaling count --config=configs/chinchilla.py:size=44 --seq_len=1024

Prints the parameter count under each published convention (Hoffmann et al.'s Table A9
convention "chinchilla", as built "total" and "non_embedding", Kaplan et al.'s "kaplan"; the
run's `train.param_convention` is marked), per-component counts as built, FLOPs per token
(forward and training; the detailed matmul count with attention and the 6N approximations), and
the run's budget: steps (resolved from train.tokens / train.tokens_per_param when train.steps is
0, parameters counted under `train.param_convention`), tokens and training FLOPs. The
vocabulary is `model.vocab_size`, else `data.vocab_size` (the size of the tokenizer the run
would train). Conventions: jaxlm/scaling/flops.py, docs/scaling.md.
"""

from __future__ import annotations

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from jaxlm.run import config as config_lib
from jaxlm.run import errors
from jaxlm.scaling import flops as scaling

PARAM_KEYS = ("total", "embedding", "token_embedding", "position_embedding", "non_embedding",
              "attention", "mlp", "norms", "head")
CONVENTION_NOTES = {
    "chinchilla": "Hoffmann et al. 2022, Table A9: layers (5 d hk + ffw matrices) + V d",
    "total": "as built: every parameter the model holds",
    "non_embedding": "as built, less the input embedding tables",
    "kaplan": "Kaplan et al. 2020: attention + MLP matrices only",
}
FLOP_KEYS = ("qkv_projections", "attention_logits", "attention_values", "output_projection",
             "mlp", "head", "forward", "train", "approx_6n", "approx_6n_total")


def count(config: ml_collections.ConfigDict, seq_len: int = 0) -> dict[str, dict[str, float]]:
    """{"params": count_params, "conventions": N under each of `scaling.PARAM_CONVENTIONS`,
    "flops_per_token": flops_per_token, "budget": the convention, N under it, steps, tokens,
    tokens per parameter and training FLOPs (detailed, and 6 N D)} of a run config."""
    config_lib.validate(config)
    cfg = config_lib.model_config(config, vocab_size=config.data.vocab_size)
    seq_len = seq_len or config.data.seq_len
    params = scaling.count_params(cfg)
    flops = scaling.flops_per_token(cfg, seq_len)
    conventions = {name: params[name] for name in scaling.PARAM_CONVENTIONS}
    convention = config.train.param_convention
    n = conventions[convention]
    steps = config_lib.resolve_steps(config, cfg).train.steps
    tokens = steps * config_lib.tokens_per_step(config)
    budget = {"param_convention": convention, "N": n, "steps": steps, "tokens": tokens,
              "tokens_per_param": tokens / n,
              "train_flops": flops["train"] * tokens,
              "train_flops_6nd": 6.0 * n * tokens}
    return {"params": params, "conventions": conventions, "flops_per_token": flops,
            "budget": budget}


def format_report(counts: dict[str, dict[str, float]]) -> str:
    p, f, b = counts["params"], counts["flops_per_token"], counts["budget"]
    lines = ["parameters by convention (docs/scaling.md)"]
    for name, n in counts["conventions"].items():
        mark = "  <- train.param_convention" if name == b["param_convention"] else ""
        lines.append(f"  {name:<22}{n:>18,}  ({CONVENTION_NOTES[name]}){mark}")
    lines.append("parameters as built")
    lines += [f"  {k:<22}{p[k]:>18,}  ({p[k] / p['total']:6.1%})" for k in PARAM_KEYS]
    lines.append("FLOPs per token (matmuls; 1 multiply-add = 2 FLOPs)")
    lines += [f"  {k:<22}{f[k]:>18.4g}" for k in FLOP_KEYS]
    lines.append(f"  {'train / 6N_total':<22}{f['train'] / f['approx_6n_total']:>18.4f}")
    lines.append(f"run budget (N = {b['param_convention']}: {b['N']:,})")
    lines.append(f"  {'steps':<22}{b['steps']:>18,}")
    lines.append(f"  {'tokens':<22}{b['tokens']:>18,}")
    lines.append(f"  {'tokens_per_param':<22}{b['tokens_per_param']:>18.2f}")
    lines.append(f"  {'train_flops':<22}{b['train_flops']:>18.4g}")
    lines.append(f"  {'train_flops_6nd':<22}{b['train_flops_6nd']:>18.4g}")
    return "\n".join(lines)


def main() -> None:
    # Flags are defined here, not at import, so that importing `count` defines no flags.
    config = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
    seq_len = flags.DEFINE_integer("seq_len", 0, "Sequence length of the FLOP count; 0 = "
                                   "data.seq_len.")
    flags.mark_flags_as_required(["config"])

    def run(argv: list[str]) -> None:
        if argv[1:] != ["count"]:
            raise app.UsageError(f"expected the command `count`, got {argv[1:]}")
        print(format_report(count(config.value, seq_len.value)))

    app.run(lambda argv: errors.run_main(run, argv))


if __name__ == "__main__":
    main()
