"""The checks of the post-training config sections (jaxlm/stages/settings.py) name the key."""

import pytest

from jaxlm.run import config as config_lib


def _config(stage, **overrides):
    c = config_lib.base_config()
    c.stage = stage
    c.init_from.path = "/runs/sft/checkpoints"
    if stage == "reward":
        c.log.sample_every = 0
    for key, value in overrides.items():
        section, leaf = key.split("__")
        c[section][leaf] = value
    return c


@pytest.mark.parametrize("stage", ["sft", "dpo", "reward"])
def test_defaults_of_every_stage_validate(stage):
    config_lib.validate(_config(stage))


@pytest.mark.parametrize("stage,overrides,message", [
    ("sft", {"sft__paths": " , "}, "sft.paths: is empty"),
    ("sft", {"sft__loss_on": "user"}, "sft.loss_on: 'user' is not one of"),
    ("sft", {"sft__truncation": "cut"}, "sft.truncation: 'cut' is not one of"),
    ("dpo", {"dpo__paths": ""}, "dpo.paths: is empty"),
    ("dpo", {"dpo__variant": "kto"}, "dpo.variant: 'kto' is not one of"),
    ("dpo", {"dpo__reference": "lazy"}, "dpo.reference: 'lazy' is not one of"),
    ("dpo", {"dpo__beta": 0.0}, "dpo.beta: must be positive"),
    ("dpo", {"dpo__label_smoothing": 0.5}, r"dpo.label_smoothing: must lie in \[0, 0.5\)"),
    ("dpo", {"init_from__path": ""}, "init_from.path: dpo.variant='sigmoid' needs a reference"),
    ("dpo", {"dpo__max_prompt_tokens": -1}, "dpo.max_prompt_tokens: must be >= 0"),
    ("dpo", {"dpo__variant": "ipo", "dpo__label_smoothing": 0.1},
     "dpo.label_smoothing: 0.1 has no effect on dpo.variant='ipo'"),
    ("dpo", {"dpo__variant": "simpo", "dpo__label_smoothing": 0.1},
     "dpo.label_smoothing: 0.1 has no effect on dpo.variant='simpo'"),
    ("dpo", {"dpo__variant": "conservative"},
     "dpo.label_smoothing: dpo.variant='conservative' is DPO with label smoothing"),
    ("reward", {"reward__paths": ""}, "reward.paths: is empty"),
    ("reward", {"reward__max_prompt_tokens": -1}, "reward.max_prompt_tokens: must be >= 0"),
    ("reward", {"log__sample_every": 10}, "log.sample_every: a reward model does not generate"),
    ("sft", {"chat__template": "alpaca"}, "chat.template"),
])
def test_bad_setting_is_named(stage, overrides, message):
    with pytest.raises(ValueError, match=f"config key {message}"):
        config_lib.validate(_config(stage, **overrides))


def test_other_stages_sections_are_not_checked():
    """A section is checked for the stages that read it, and only for them."""
    wrong = {"dpo__variant": "kto", "sft__paths": ""}
    config_lib.validate(_config("pretrain", **wrong))  # pretraining reads neither section
    with pytest.raises(ValueError, match="config key dpo.variant"):
        config_lib.validate(_config("dpo", **wrong))
    with pytest.raises(ValueError, match="config key sft.paths"):
        config_lib.validate(_config("sft", **wrong))
    c = _config("dpo", dpo__variant="simpo", init_from__path="", sft__loss_on="user")
    config_lib.validate(c)  # simpo needs no reference model; the sft section is not read
    with pytest.raises(ValueError, match="config key sft.loss_on"):
        config_lib.validate(_config("sft", sft__loss_on="user"))
