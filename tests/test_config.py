"""Config validation: every mistake is caught before compiling, with the key named."""

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm.run import config as config_lib
from tests.cli import run_cli

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
    ("train", "eval_every", 50, r"^config key train.eval_every: renamed to eval.every_steps$"),
    ("train", "eval_steps", 4,
     r"^config key train.eval_steps: renamed to eval.tokens \(held-out tokens per evaluation, "
     r"not batches; eval.examples counts"),
    ("ppo", "kl_coef", 0.1, r"^config key ppo.kl_coef: renamed to rl.kl_coef$"),
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
    proc = run_cli("jaxlm.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
                   "--config.train.num_microbatches=4", check=False)
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


def _fields(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_nested_model_sections_and_quant_are_their_dataclasses():
    """`model.moe`, `model.rope_scaling`, `model.lora` and `quant` hold exactly the fields of
    the typed values they become (MoeConfig, RopeScaling, the lora_* fields, QuantSpec), with
    the same defaults, so a field added to one side cannot be missing from the other."""
    from jaxlm.models.config import ModelConfig, MoeConfig
    from jaxlm.models.quant.settings import DERIVED_QUANT_KEYS
    from jaxlm.models.quant.spec import QuantSpec
    from jaxlm.models.rope import RopeScaling
    from jaxlm.models.settings import LORA_FIELDS

    c = config_lib.base_config()
    for section, cls in ((c.model.moe, MoeConfig), (c.model.rope_scaling, RopeScaling),
                         (c.quant, QuantSpec)):
        fields = _fields(cls)
        assert set(section.keys()) == set(fields), cls.__name__
        for key, default in fields.items():
            if cls is QuantSpec and key in DERIVED_QUANT_KEYS:
                continue  # -1: the weight type's default, resolved by quant_spec
            if default is not dataclasses.MISSING:
                assert section[key] == default, (cls.__name__, key)
    model_fields = _fields(ModelConfig)
    lora_fields = {name for name in model_fields if name.startswith("lora_")}
    assert set(LORA_FIELDS.values()) == lora_fields
    assert set(c.model.lora.keys()) == set(LORA_FIELDS)
    assert c.model.lora.alpha == model_fields["lora_alpha"]
    assert c.model.lora.dropout == model_fields["lora_dropout"]
    # The typed config carries every nested value it is given (no key dropped on the way).
    c.model.vocab_size = 300
    c.model.moe.update(num_experts=4, top_k=1, every=2)
    c.model.rope_scaling.update(kind="linear", factor=2.0)
    c.model.lora.update(rank=4, alpha=8.0, dropout=0.1)
    cfg = config_lib.model_config(c)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.every) == (4, 1, 2)
    assert (cfg.rope_scaling.kind, cfg.rope_scaling.factor) == ("linear", 2.0)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (4, 8.0, 0.1)
    assert "w_in" not in cfg.lora_targets
    c.model.moe.num_experts, c.model.lora.mlp = 0, True
    assert "w_in" in config_lib.model_config(c).lora_targets


def _comment_above(source: str, assignment: str) -> str:
    """The comment lines right above `assignment` in a section's defaults function."""
    lines = source.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith(assignment))
    comment = []
    for line in reversed(lines[:at]):
        if not line.strip().startswith("#"):
            break
        comment.append(line)
    return " ".join(comment)


def _doc_entry(doc: str, name: str) -> str:
    """The `name: ...` entry of a Google-style Attributes list, continuation lines included."""
    lines = doc.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
    indent = len(lines[at]) - len(lines[at].lstrip())
    entry = [lines[at]]
    for line in lines[at + 1:]:
        if len(line) - len(line.lstrip()) <= indent:
            break
        entry.append(line)
    return " ".join(entry)


def test_every_choice_is_documented_where_the_key_is_declared():
    """Each choice a key accepts is named in the comment above the key in its section and in
    ModelConfig's docstring (a choice added to the tuple must be documented in both)."""
    from jaxlm.models import config as model_config_lib
    from jaxlm.models import rope, settings
    from jaxlm.models.quant import settings as quant_settings
    from jaxlm.models.quant import spec

    model_source = inspect.getsource(settings.default_model_config)
    doc = model_config_lib.ModelConfig.__doc__
    for key, choices in (("position_embedding", model_config_lib.POSITION_EMBEDDINGS),
                         ("norm", model_config_lib.NORMS),
                         ("mlp_activation", model_config_lib.MLP_ACTIVATIONS),
                         ("remat", model_config_lib.REMAT_POLICIES),
                         ("attention", model_config_lib.ATTENTION_IMPLS)):
        comment = _comment_above(model_source, f"m.{key} =")
        entry = _doc_entry(doc, key)
        for choice in choices:
            assert f'"{choice}"' in comment, (key, choice, comment)
            assert f'"{choice}"' in entry, (key, choice)
    comment = _comment_above(model_source, "rs.kind =")
    assert all(f'"{kind}"' in comment for kind in rope.ROPE_SCALINGS), comment
    quant_source = inspect.getsource(quant_settings.default_quant_config)
    for key, choices in (("mode", spec.MODES), ("weight", spec.WEIGHT_TYPES),
                         ("activation", spec.ACTIVATION_TYPES)):
        comment = _comment_above(quant_source, f"q.{key} =")
        assert all(f'"{choice}"' in comment for choice in choices), (key, comment)


def test_each_section_has_one_owner_and_every_stage_section_is_in_the_schema():
    from jaxlm.stages import all_sections

    names = [section.name for section in config_lib.SECTIONS]
    assert len(names) == len(set(names))
    assert set(all_sections()) == set(config_lib.STAGE_SECTIONS)
    for section in config_lib.SECTIONS:  # declared beside the concept, not in the config module
        assert section.defaults.__module__ != config_lib.__name__, section.name


def test_base_config_imports_no_stage_module():
    """The schema is built from the sections' owners; no stage (JAX steps, data pipelines) is
    imported to read or check a config file."""
    code = ("import sys; from jaxlm.run import config; config.base_config(); "
            "from jaxlm.stages import STAGE_MODULES; "
            "print([m for m in STAGE_MODULES.values() if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"
