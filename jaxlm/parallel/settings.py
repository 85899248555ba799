"""The `mesh` section of a run config: the device mesh's axis sizes (jaxlm/parallel/sharding.py
maps the model's logical axes onto these axes)."""

from __future__ import annotations

import ml_collections

from jaxlm.run import errors
from jaxlm.run.section import Section

MESH_AXES = ("data", "fsdp", "tensor", "pipeline", "expert")


def default_mesh_config() -> ml_collections.ConfigDict:
    """The `mesh` section with its defaults."""
    me = ml_collections.ConfigDict()
    # Device-mesh axis sizes; one of them may be -1 ("the rest of the devices").
    me.data = -1
    me.fsdp = 1
    me.tensor = 1
    # Pipeline stages: the blocks are split into this many stages of num_layers / pipeline
    # layers each (GPipe or circular schedule, see docs/pipeline.md). Never -1.
    me.pipeline = 1
    # Expert parallelism: MoE experts are split over this axis (it also splits the batch).
    me.expert = 1
    return me


def check_mesh(config: ml_collections.ConfigDict) -> None:
    """Every axis size is positive or -1 (checked against the devices by config.check_devices)."""
    for axis in MESH_AXES:
        size = config.mesh[axis]
        if size == 0 or size < -1:
            raise errors.config_error(f"mesh.{axis}", f"size must be positive or -1, got {size}")


MESH = Section("mesh", default_mesh_config, check_mesh)
