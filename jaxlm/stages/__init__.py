"""The registry of training stages: `config.stage` -> the module that defines its `STAGE`.

A stage is one module defining `STAGE = jaxlm.stages.stage.Stage(...)` plus one line here; the
program builder, the trainer and the config schema find everything else through it (the config
sections the stages read through `all_sections`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jaxlm.run.errors import ConfigError

if TYPE_CHECKING:
    from jaxlm.run.section import Section
    from jaxlm.stages.stage import Stage

STAGE_MODULES = {
    "pretrain": "jaxlm.stages.pretrain",
    "sft": "jaxlm.stages.sft",
    "dpo": "jaxlm.stages.dpo",
    "reward": "jaxlm.stages.reward",
    "grpo": "jaxlm.stages.grpo",
    "rejection": "jaxlm.stages.rejection",
    "ppo": "jaxlm.stages.ppo",
    "distill": "jaxlm.stages.distill",
}


def get_stage(name: str) -> Stage:
    if name not in STAGE_MODULES:
        raise ConfigError(f"config key stage: {name!r} is not one of {tuple(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name]).STAGE


def all_stages() -> list[Stage]:
    return [get_stage(name) for name in STAGE_MODULES]


def all_sections() -> list[Section]:
    """Every config section a stage reads, once each (several stages may read one section, e.g.
    `rl`). Two different `Section`s under one name are an error: a section has one owner."""
    found: dict[str, Section] = {}
    for stage in all_stages():
        for section in stage.sections:
            if found.setdefault(section.name, section) is not section:
                raise ValueError(f"config section {section.name!r} is declared twice (stage "
                                 f"{stage.name}); declare it once and list that Section")
    return list(found.values())
