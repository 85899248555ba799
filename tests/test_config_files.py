"""Config files that build on another one (`config.load_config_file`) give the same run config
as when each spelled out every setting: tests/data/configs_before_dedup.json holds the dicts the
files produced before they were de-duplicated."""

import json
from pathlib import Path

import pytest

from jaxlm.run import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
BEFORE = json.loads((ROOT / "tests" / "data" / "configs_before_dedup.json").read_text())


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_config_dict_is_unchanged(case):
    """Every key the frozen dict has keeps its value; keys added to base_config since then
    (absent from the frozen dict) keep their base default, i.e. no config file sets them."""
    name, _, arg = case.partition(":")
    c = config_lib.load_config_file(ROOT / "configs" / f"{name}.py", arg or None)
    # Through JSON like the frozen dicts, so tuples/lists compare alike.
    got = _flat(json.loads(json.dumps(c.to_dict())))
    base = _flat(json.loads(json.dumps(config_lib.base_config().to_dict())))
    want = _flat(BEFORE[case])
    assert {k: v for k, v in got.items() if k in want} == want
    assert {k: v for k, v in got.items() if k not in want} == {
        k: base[k] for k in got if k not in want}


def test_derived_files_take_their_base_and_argument():
    tiny = config_lib.load_config_file(ROOT / "configs" / "tiny.py", "steps=7")
    moe = config_lib.load_config_file(ROOT / "configs" / "tiny_moe.py", "steps=7,experts=4")
    assert moe.train.steps == tiny.train.steps == 7
    assert moe.model.moe.num_experts == 4 and tiny.model.moe.num_experts == 0
    moe.model.moe, moe.mesh.expert = tiny.model.moe, tiny.mesh.expert
    assert moe.to_dict() == tiny.to_dict()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        config_lib.load_config_file(tmp_path / "nope.py")


def test_the_rl_chains_phases_start_from_models_of_their_own_shape():
    """configs/grpo_tiny.py's PPO chain (docs/rl.md): the reward phase starts from the
    reward_sft phase's checkpoint and PPO's policy from the sft phase's, so each pair of models
    must agree; the reward model's SFT reads the policy's tokenizer (`tokenizer=`)."""
    def load(name, arg):
        return config_lib.load_config_file(ROOT / "configs" / name, arg)

    reward_sft = load("grpo_tiny.py", "phase=reward_sft,tokenizer=/runs/pt/sp.model")
    reward = load("grpo_tiny.py", "phase=reward,init=/runs/rm_sft/checkpoints")
    sft = load("grpo_tiny.py", "phase=sft,init=/runs/pt/checkpoints")
    ppo = load("ppo_tiny.py", "init=/runs/sft/checkpoints,reward_model=/runs/rm/checkpoints")
    assert reward_sft.model.to_dict() == reward.model.to_dict()
    assert ppo.model.to_dict() == sft.model.to_dict()
    assert reward.model.num_layers > sft.model.num_layers
    assert reward_sft.data.tokenizer_path == "/runs/pt/sp.model"
    assert (reward_sft.stage, reward.stage, ppo.stage) == ("sft", "reward", "ppo")
