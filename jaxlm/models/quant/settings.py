"""The `quant` section of a run config: weight quantization through qwix (docs/quantization.md).

Its keys are the fields of `QuantSpec` (jaxlm/models/quant/spec.py), which checks their values;
this module adds the defaults and what a training run may hold.
"""

from __future__ import annotations

import ml_collections

from jaxlm.models.quant.spec import NO_QUANT, QuantSpec
from jaxlm.run import errors
from jaxlm.run.section import Section


def default_quant_config() -> ml_collections.ConfigDict:
    """The `quant` section with its defaults."""
    q = ml_collections.ConfigDict()
    # "none"; "qat": train with fake-quantized matmul weights (straight-through gradients);
    # "ptq": the matmul weights are held quantized: with model.lora.rank > 0 the frozen base of
    # QLoRA, otherwise what `jaxlm.tools.quantize` / --quantize write for inference.
    q.mode = "none"
    # Weight type: "int8", "int4" or "nf4" (4-bit NormalFloat).
    q.weight = "int8"
    # "none" (float activations) or "int8": activations quantized per token at run time,
    # int8 x int8 matmuls (ptq, int8 weights).
    q.activation = "none"
    # 0 = one scale per output channel; T = one per T inputs of each output channel; -1 = the
    # weight type's default: 64 for nf4 (QLoRA's blocks of 64), 0 for int8 and int4.
    q.tile_size = -1
    return q


# quant.tile_size = -1: nf4 in blocks of 64 inputs as QLoRA (Dettmers et al. 2023; relative
# RMS error 9.2% on Gaussian weights, 11.0% with one scale per output channel).
DEFAULT_TILE_SIZE = {"nf4": 64}
# `quant.*` keys whose section value is resolved before it becomes the QuantSpec field.
DERIVED_QUANT_KEYS = ("tile_size",)


def quant_spec(config: ml_collections.ConfigDict) -> QuantSpec:
    """The `quant` section as a QuantSpec (a saved config without the section: no quant)."""
    q = config.get("quant")
    if q is None:
        return NO_QUANT
    tile = DEFAULT_TILE_SIZE.get(q.weight, 0) if q.tile_size == -1 else q.tile_size
    return QuantSpec(mode=q.mode, weight=q.weight, activation=q.activation, tile_size=tile)


def check_quant(config: ml_collections.ConfigDict) -> None:
    """Valid values (QuantSpec.check), and a run that trains holds quantized weights only as
    QLoRA's frozen base."""
    quant_spec(config).check(lambda key, msg: _fail(f"quant.{key}", msg))
    q = config.quant
    if q.mode == "ptq" and not config.model.lora.rank:
        _fail("quant.mode", "'ptq' weights cannot be trained: quantize a trained checkpoint "
              "with `python -m jaxlm.tools.quantize` (or --quantize), use 'qat' to train with "
              "fake quantization, or set model.lora.rank > 0 for QLoRA's quantized frozen base")
    if q.mode == "ptq" and q.activation != "none":
        _fail("quant.activation", "activation quantization is for inference only; QLoRA "
              "trains with quant.activation='none'")


def _fail(key: str, msg: str) -> None:
    raise errors.config_error(key, msg)


QUANT = Section("quant", default_quant_config, check_quant)
