"""Folds the LoRA adapters of a run's checkpoint into its base weights, for export and sampling.

    python -m jaxlm.tools.merge_lora --checkpoints=/tmp/run_lora/checkpoints \
        --output=/tmp/run_merged/checkpoints

reads the newest (or --step) checkpoint of a run trained with model.lora.rank > 0 and writes a
checkpoint holding only the merged params W + (alpha / r) A B, with the run's config (LoRA
switched off) and extras (tokenizer path). The output serves as `init_from.path` of a later run
or for sampling, like any plain checkpoint; the merged model gives the logits of base +
adapters. --output must be a new or empty directory outside the run (--overwrite replaces a
non-empty one); it appears only once complete (`jaxlm.weights.write`).
"""

import jax
from absl import app, flags

from jaxlm.parallel import sharding
from jaxlm.run import console, errors
from jaxlm.weights import restore
from jaxlm.weights.write import output_directory, write_params_checkpoint


def merge_checkpoint(checkpoints: str, output: str, step: int | None = None, *,
                     overwrite: bool = False) -> int:
    """Writes the merged params of `checkpoints` (a run's workdir or its checkpoint directory;
    step None: newest) to `output`; returns the step written."""
    saved = restore.read_checkpoint(checkpoints, step)
    if not saved.has_lora:
        raise errors.CheckpointError(f"{checkpoints}: checkpoint {saved.step} has no LoRA "
                                     "adapters (its model.lora.rank is 0); there is nothing to "
                                     "merge", path=saved.directory)
    with output_directory(output, (checkpoints, *saved.sources), overwrite=overwrite,
                          flag="--output") as directory:
        one_device = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1},
                                        devices=jax.devices()[:1])
        merged = restore.restore(saved.directory, saved.step, one_device, merge_lora=True)
        write_params_checkpoint(directory, merged.step, merged.params, merged.config,
                                merged.extra)
    return merged.step


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    with console.quiet(None):  # orbax's save and restore lines stay off the console
        step = errors.run_main(lambda: merge_checkpoint(
            f.checkpoints, f.output, None if f.step < 0 else f.step, overwrite=f.overwrite))
    print(f"merged LoRA adapters of step {step} into {f.output}")


def _define_flags() -> None:
    """Flags are defined only when run as a script, so importing `merge_checkpoint` next to
    another absl program (jaxlm.tools.generate also has --step) does not clash."""
    flags.DEFINE_string("checkpoints", None, "<workdir>/checkpoints of a LoRA run.")
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = the newest.")
    flags.DEFINE_string("output", None, "Checkpoint directory to write (new or empty).")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output (never the run).")
    flags.mark_flags_as_required(["checkpoints", "output"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)
