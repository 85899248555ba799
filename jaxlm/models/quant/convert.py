"""Post-training quantization of a trained checkpoint: in memory after loading (`--quantize`
of `jaxlm.tools.generate` / `jaxlm.tools.eval`) or written out as a quantized checkpoint
(`jaxlm.tools.quantize`) that those tools load as they load any run.

A quantized checkpoint is an ordinary jaxlm checkpoint whose params are the QArray tree (each
quantized weight saved as its values and scales; int8 and int4 values are stored as such, nf4
codes as uint8) and whose saved config has `quant.mode = "ptq"`: the model built from that
config declares the same QArray tree, so the checkpoint restores through the usual path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from jaxlm.models import ModelConfig
from jaxlm.models.quant import quantizer
from jaxlm.models.quant.spec import QuantSpec, from_preset
from jaxlm.parallel import sharding


def quantize_model(model_cfg: ModelConfig, params: Any, spec: QuantSpec, mesh: Mesh | None
                   ) -> tuple[ModelConfig, Any]:
    """(the model config with `spec`, params quantized with it), laid out over `mesh` as the
    quantized model's params are (values like the float weights, scales by their shape)."""
    if model_cfg.quant.quantized:
        raise ValueError(f"the params are already quantized ({model_cfg.quant.weight}); "
                         "quantize a float checkpoint")
    new_cfg = dataclasses.replace(model_cfg, quant=spec)
    new_cfg.check()
    quantize = lambda p: quantizer.quantize_params(p, spec)
    if mesh is None:
        return new_cfg, jax.jit(quantize)(params)
    from jaxlm.inference.sampler import param_shardings

    with sharding.activate(mesh):
        out = jax.jit(quantize, out_shardings=param_shardings(new_cfg, mesh))(params)
    return new_cfg, out


def quantize_loaded(loaded: Any, preset: str, tile_size: int = 0, mesh: Mesh | None = None
                    ) -> Any:
    """A restored model (`jaxlm.weights.restore.Restored`, evaluation `Target`: anything with
    model_cfg, params and config) with its weights quantized as `--quantize=preset` says;
    unchanged for ""."""
    if not preset:
        return loaded
    spec = from_preset(preset, tile_size)
    model_cfg, params = quantize_model(loaded.model_cfg, loaded.params, spec, mesh)
    return dataclasses.replace(loaded, model_cfg=model_cfg, params=params,
                               config=with_quant(loaded.config, spec))


def with_quant(config: ml_collections.ConfigDict, spec: QuantSpec) -> ml_collections.ConfigDict:
    """A copy of a run config whose `quant` section is `spec`."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.quant = ml_collections.ConfigDict(dataclasses.asdict(spec))
    return config
