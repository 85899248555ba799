"""Folds the LoRA adapters of a run's checkpoint into its base weights, for export and sampling.

    python -m jaxlm.tools.merge_lora --checkpoints=/tmp/run_lora/checkpoints \
        --output=/tmp/run_merged/checkpoints

reads the newest (or --step) checkpoint of a run trained with model.lora.rank > 0 and writes a
checkpoint holding only the merged params W + (alpha / r) A B, with the run's config (LoRA
switched off) and extras (tokenizer path). The output serves as `init_from.path` of a later run
or for sampling, like any plain checkpoint; the merged model gives the logits of base +
adapters.
"""

import os

import flax.linen as nn
import jax
import ml_collections
from absl import app, flags

from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.models import Transformer, lora
from jaxlm.run import config as config_lib
from jaxlm.run import errors
from jaxlm.run.checkpoint import Checkpointer, complete_steps, read_saved_json, restore_params
from jaxlm.run.train_state import abstract_boxed_params


def merge_checkpoint(checkpoints: str, output: str, step: int | None = None) -> int:
    """Writes the merged params of `checkpoints` (step None: newest) to `output`; returns the
    step written."""
    config = ml_collections.ConfigDict(read_saved_json(checkpoints, step, "config"))
    extra = read_saved_json(checkpoints, step, "extra")
    rank, alpha = config.model.lora.rank, config.model.lora.alpha
    if not rank:
        raise ValueError(f"{checkpoints}: the run has no LoRA adapters (model.lora.rank = 0)")
    vocab = load_tokenizer(extra["tokenizer_path"]).vocab_size if extra.get(
        "tokenizer_path") else None
    model = Transformer(config_lib.model_config(config, vocab))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            nn.meta.unbox(abstract_boxed_params(model, config.data.seq_len)))
    params = restore_params(checkpoints, step, abstract)
    merged = lora.merge(params, rank, alpha)
    config.model.lora.rank = 0
    if "quant" in config and config.quant.mode == "ptq":  # QLoRA: the merged weights are float
        config.quant.mode = "none"
    if step is None:
        step = complete_steps(os.path.abspath(checkpoints))[-1]
    with Checkpointer(output, save_every=0, keep_last=1, async_save=False) as ckpt:
        ckpt.save(step, {"params": merged}, config=config, extra=extra)
    return step


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    step = merge_checkpoint(flags.FLAGS.checkpoints, flags.FLAGS.output,
                            None if flags.FLAGS.step < 0 else flags.FLAGS.step)
    print(f"merged LoRA adapters of step {step} into {flags.FLAGS.output}")


def _define_flags() -> None:
    """Flags are defined only when run as a script, so importing `merge_checkpoint` next to
    another absl program (jaxlm.tools.generate also has --step) does not clash."""
    flags.DEFINE_string("checkpoints", None, "<workdir>/checkpoints of a LoRA run.")
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = the newest.")
    flags.DEFINE_string("output", None, "Checkpoint directory to write.")
    flags.mark_flags_as_required(["checkpoints", "output"])


if __name__ == "__main__":
    _define_flags()
    app.run(lambda argv: errors.run_main(main, argv))
