"""Writes a post-training-quantized copy of a run's checkpoint.

    python -m jaxlm.tools.quantize --workdir=/tmp/jaxlm_tiny --quantize=int8 --out=/tmp/tiny_int8
    python -m jaxlm.tools.quantize --workdir=RUN --quantize=int4 --tile_size=32 --out=DIR
    python -m jaxlm.tools.generate --workdir=/tmp/tiny_int8 --prompt="def"

--quantize: int8, int4, nf4 (weights only) or int8_dynamic (int8 weights; activations are
quantized per token when the model runs). --tile_size: 0 = one scale per output channel,
T = one per T inputs (sub-channel). The output is a checkpoint directory holding the quantized
params (the QArray tree), the run's config with its `quant` section set and the run's extras
(tokenizer), at the same step; `jaxlm.tools.generate` and `jaxlm.tools.eval` load it like any run
(docs/quantization.md). --out must be a new or empty directory outside the run (--overwrite
replaces a non-empty one); it appears only once complete (`jaxlm.weights.write`).
"""

from __future__ import annotations

from absl import app, flags

from jaxlm.run import errors


def _define_flags() -> None:
    """Defined only when run as a program, so importing `quantize_checkpoint` next to another
    absl program (jaxlm.tools.generate also has --workdir) does not clash."""
    flags.DEFINE_string("workdir", None, "Run directory (or its checkpoints/ directory).")
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = the newest.")
    flags.DEFINE_string("quantize", "int8", "int8, int4, nf4 or int8_dynamic.")
    flags.DEFINE_integer("tile_size", 0, "Inputs per scale (0 = per output channel).")
    flags.DEFINE_string("out", None, "Output checkpoint directory (new or empty).")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out (never the run itself).")


def quantize_checkpoint(workdir: str, out: str, preset: str, tile_size: int = 0,
                        step: int | None = None, *, overwrite: bool = False) -> int:
    """Writes the `preset`-quantized params of `workdir`'s checkpoint (step None: newest) to
    `out`; returns the step written."""
    from jaxlm.models.quant.convert import quantize_loaded
    from jaxlm.models.quant.spec import from_preset
    from jaxlm.weights.restore import read_checkpoint, restore
    from jaxlm.weights.write import output_directory, write_params_checkpoint

    from_preset(preset, tile_size)  # a bad --quantize before anything is read
    saved = read_checkpoint(workdir, step)
    with output_directory(out, (workdir, *saved.sources), overwrite=overwrite,
                          flag="--out") as directory:
        quantized = quantize_loaded(restore(saved.directory, saved.step), preset, tile_size)
        write_params_checkpoint(directory, quantized.step, quantized.params, quantized.config,
                                quantized.extra)
    return quantized.step


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxlm.run import console

    f = flags.FLAGS
    with console.quiet(None):  # orbax's save and restore lines stay off the console
        step = errors.run_main(lambda: quantize_checkpoint(
            f.workdir, f.out, f.quantize, f.tile_size, None if f.step < 0 else f.step,
            overwrite=f.overwrite))
    print(f"{f.quantize} params of step {step} -> {f.out}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
