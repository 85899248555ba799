"""A config section: the unit in which the run config's schema is declared.

Every section (`model`, `optim`, `train`, ..., and the stages' `sft`, `rl`, ...) is declared once,
as a `Section`, by the module that owns its concept; `jaxlm.run.config.SECTIONS` lists them all.
Importing this module pulls in nothing but ml_collections.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Section:
    """A config section, declared once by the module that owns its concept.

    `base_config` adds its defaults; `validate` runs its check for every run (a core section)
    or for a run of a stage that lists it in `Stage.sections` (a stage's section).

    Attributes:
      name: the section's key in the run config (`model`, `rl`, ...).
      defaults: () -> the section's ConfigDict of defaults, one commented line per key.
      check: config -> None, raising ValueError that names the key that is wrong; it gets the
        whole run config, since some keys are checked against another section's.
    """

    name: str
    defaults: Callable[[], Config]
    check: Callable[[Config], None] | None = None
