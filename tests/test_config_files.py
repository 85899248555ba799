"""Config files that build on another one (`config.load_config_file`) give the same run config
as when each spelled out every setting: tests/data/configs_before_dedup.json holds the dicts the
files produced before they were de-duplicated."""

import json
from pathlib import Path

import pytest

from jaxlm import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
BEFORE = json.loads((ROOT / "tests" / "data" / "configs_before_dedup.json").read_text())


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_config_dict_is_unchanged(case):
    name, _, arg = case.partition(":")
    c = config_lib.load_config_file(ROOT / "configs" / f"{name}.py", arg or None)
    # Through JSON like the frozen dicts, so tuples/lists compare alike.
    assert json.loads(json.dumps(c.to_dict())) == BEFORE[case]


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
