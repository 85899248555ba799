"""One module per training stage; the trainer looks a stage up here by `config.stage`.

A stage module provides `make_steps(config, model, tx, lr_schedule)` returning
`(train_step(state, batch) -> (state, metrics), eval_step(params, batch) -> sums)` with its
static settings bound, and `make_data(...)` returning its train/eval iterators. The trainer
knows nothing about a stage's loss or batch layout beyond that.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGE_MODULES = {
    "pretrain": "jaxlm.stages.pretrain",
    "sft": "jaxlm.stages.sft",
    "dpo": "jaxlm.stages.dpo",
    "reward": "jaxlm.stages.reward",
}


def get_stage(name: str) -> ModuleType:
    if name not in STAGE_MODULES:
        raise ValueError(f"config key stage: {name!r} is not one of {sorted(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name])
