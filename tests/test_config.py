"""Config validation: every mistake is caught before compiling, with the key named."""

import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm.run import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


def _config(**overrides):
    c = config_lib.base_config()
    for dotted, value in overrides.items():
        section, key = dotted.split("__") if "__" in dotted else (None, dotted)
        (c[section] if section else c)[key] = value
    return c


def test_base_config_is_valid():
    config_lib.validate(config_lib.base_config())


@pytest.mark.parametrize("overrides,key", [
    ({"model__num_heads": 5}, "model.num_heads"),
    ({"model__num_kv_heads": 3}, "model.num_kv_heads"),
    ({"model__norm": "batchnorm"}, "model.norm"),
    ({"model__remat": "sometimes"}, "model.remat"),
    ({"model__compute_dtype": "float99"}, "model.compute_dtype"),
    ({"model__max_seq_len": 8}, "model.max_seq_len"),
    ({"optim__learning_rate": -1.0}, "optim.learning_rate"),
    ({"optim__warmup_steps": -1}, "optim.warmup_steps"),
    ({"optim__min_lr_ratio": 2.0}, "optim.min_lr_ratio"),
    ({"train__steps": -1}, "train.steps"),
    ({"train__tokens": 100}, "train.tokens"),
    ({"train__steps": 0, "train__tokens": 9, "train__tokens_per_param": 5.0},
     "train.tokens_per_param"),
    ({"stage": "rlhf"}, "stage"),
    ({"mesh__tensor": 0}, "mesh.tensor"),
    ({"mesh__pipeline": 3}, "mesh.pipeline"),
    ({"log__every_steps": 0}, "log.every_steps"),
])
def test_bad_values_name_their_key(overrides, key):
    with pytest.raises(ValueError, match=f"config key {key}"):
        config_lib.validate(_config(**overrides))


@pytest.mark.parametrize("section,key,value,message", [
    ("model", "nmu_layers", 3,
     r"model.nmu_layers: unknown key \(did you mean model.num_layers\?\)"),
    (None, "optimizer", {"lr": 1}, "config key optimizer: unknown key"),
    ("train", "num_microbatches", 4,
     r"^config key train.num_microbatches: renamed to train.pipeline_microbatches$"),
])
def test_unknown_and_renamed_keys_are_named(section, key, value, message):
    """An unknown key is named with a close match; a renamed key names its new name."""
    c = config_lib.base_config()
    (c if section is None else c[section])[key] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c)


def _has_key(config, dotted):
    *sections, leaf = dotted.split(".")
    for section in sections:
        if section not in config:
            return False
        config = config[section]
    return leaf in config


def test_renamed_keys_point_from_a_gone_key_to_a_live_one():
    base = config_lib.base_config()
    assert config_lib.RENAMED_KEYS
    for old, new in config_lib.RENAMED_KEYS.items():
        assert not _has_key(base, old) and _has_key(base, new)




def test_renamed_key_as_a_command_line_override_names_the_new_key(tmp_path):
    cmd = [sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py",
           f"--workdir={tmp_path / 'run'}", "--config.train.num_microbatches=4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("error: config key train.num_microbatches: renamed to train.pipeline_microbatches"
            in proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_mesh_must_match_the_devices():
    c = _config(mesh__data=2, mesh__fsdp=2, mesh__tensor=1)
    with pytest.raises(ValueError, match="mesh"):
        config_lib.check_devices(c, num_devices=8)
    assert config_lib.check_devices(_config(mesh__data=-1, mesh__tensor=2), 8)["data"] == 4


def test_batch_must_divide_over_data_parallel_replicas_and_microbatches():
    c = _config(mesh__data=-1, mesh__fsdp=1)
    c.train.global_batch_size = 12
    with pytest.raises(ValueError, match="config key train.global_batch_size"):
        config_lib.check_devices(c, num_devices=8)
    c.train.global_batch_size = 16
    c.optim.grad_accum_steps = 3
    with pytest.raises(ValueError, match="config key optim.grad_accum_steps"):
        config_lib.check_devices(c, num_devices=8)


def test_derived_model_sizes():
    cfg = config_lib.model_config(_config(model__d_model=128, model__num_heads=4), vocab_size=300)
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.d_ff, cfg.padded_vocab_size) == (32, 4, 512, 384)


def test_config_argument_parsing():
    arg = config_lib.parse_arg("size=1018,smoke=True", size=44, smoke=False, data="")
    assert (arg.size, arg.smoke, arg.data) == (1018, True, "")
    with pytest.raises(ValueError, match="sise"):
        config_lib.parse_arg("sise=3", size=44)
    with pytest.raises(ValueError, match="config argument size"):
        config_lib.parse_arg("size=big", size=44)


def test_model_section_and_model_config_are_one_schema():
    """Every `model.*` key is a ModelConfig field of the same name (copied as is, same default)
    or one of the few derived keys; so a new model option is declared once per layer and the
    two defaults cannot drift apart."""
    import dataclasses

    from jaxlm.models import ModelConfig

    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    model = config_lib.base_config().model
    for key in model.keys():
        if key in config_lib.DERIVED_MODEL_KEYS:
            continue
        assert key in fields, f"model.{key} is neither a ModelConfig field nor derived"
        default = fields[key].default
        if default is not dataclasses.MISSING:
            assert model[key] == default, f"model.{key}: {model[key]!r} vs {default!r}"
    # A config saved before a key existed still builds (the field's default).
    c = config_lib.base_config()
    c.model.vocab_size = 300
    del c.model["sliding_window"]
    assert config_lib.model_config(c).sliding_window == fields["sliding_window"].default
