"""Writing a params-only checkpoint: the one writer of the tools that make a checkpoint from
another (`jaxlm.tools.quantize`, `jaxlm.tools.merge_lora`, the Hugging Face import).

The step is laid out as the trainer's `jaxlm.run.checkpoint.Checkpointer` lays one out, with the
params alone as its state, so `jaxlm.weights.restore` (and `init_from`) read it like any run:

    <directory>/<step>/state/   {"params": ...}
    <directory>/<step>/config/  the run config of the params (JSON)
    <directory>/<step>/extra/   the run's extras (tokenizer path and hash, ...)

orbax writes the step into a temporary directory and renames it once every item is on disk, so
a tool stopped half-way leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from jaxlm.run import checkpoint


def write_params_checkpoint(directory: str, step: int, params: Any, config: Any,
                            extra: dict[str, Any], *,
                            type_handlers: Sequence[tuple[type, Any]] = (),
                            ocdbt: bool = True) -> str:
    """Writes checkpoint `step` holding `params` (a pytree of arrays) with the run `config`
    (ConfigDict or dict) and `extra` under `directory`; returns the directory.

    `type_handlers`: (leaf type, orbax TypeHandler) pairs for leaves that are not arrays (the
    import's lazily made params). `ocdbt=False` writes each param as its own zarr array, whose
    data orbax then need not hold until the end of the save. A step that already exists is an
    error, never overwritten."""
    directory = checkpoint.absolute(directory)
    handlers = ({"type_handler_registry": ocp.type_handlers.create_type_handler_registry(
        *type_handlers)} if type_handlers else {})
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, **handlers)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(checkpoint.STATE, ocp.args.PyTreeSave, handler)
    for name in checkpoint.JSON_ITEMS:
        registry.add(name, ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler())
    options = ocp.CheckpointManagerOptions(step_name_format=checkpoint.step_name_format(),
                                           create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, options=options, handler_registry=registry) as mngr:
        if step in mngr.all_steps():
            raise FileExistsError(f"{directory} already holds a checkpoint for step {step}")
        mngr.save(step, args=ocp.args.Composite(**{
            checkpoint.STATE: ocp.args.PyTreeSave({"params": params}),
            checkpoint.CONFIG: ocp.args.JsonSave(checkpoint.json_item(config,
                                                                      checkpoint.CONFIG)),
            checkpoint.EXTRA: ocp.args.JsonSave(checkpoint.json_item(extra,
                                                                     checkpoint.EXTRA))}))
    logging.info("params checkpoint: step %d -> %s", step, directory)
    return directory
