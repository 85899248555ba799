"""configs/chinchilla.py reproduces every row of Chinchilla's Table A9, counted under the paper's
parameter convention; token budgets -> steps under train.param_convention."""

import csv
import importlib.util
import math
from pathlib import Path

import pytest

from jaxlm.run import config as config_lib
from jaxlm.scaling import chinchilla
from jaxlm.scaling import flops as scaling

ROOT = Path(__file__).resolve().parents[1]
# The published table (see tests/data/README.md for its source).
TABLE_CSV = ROOT / "tests" / "data" / "chinchilla_table_a9.csv"


def _load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _published_rows() -> list[dict[str, int]]:
    with open(TABLE_CSV) as f:
        return [{k: int(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_table_is_the_published_one():
    rows = _published_rows()
    assert len(rows) == len(chinchilla.TABLE_A9) == 50
    assert [chinchilla.row(r["params_million"]) for r in rows] == rows


@pytest.mark.parametrize("size", chinchilla.SIZES)
def test_config_builds_table_row(size):
    c = _load("chinchilla", f"size={size}")
    cfg = config_lib.model_config(c)
    r = chinchilla.row(size)
    assert (cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
            cfg.num_layers, cfg.vocab_size) == (r["d_model"], r["ffw_size"], r["kv_size"],
                                                r["n_heads"], r["n_heads"], r["n_layers"], 32000)
    assert not cfg.tie_embeddings and cfg.mlp_activation == "gelu"
    assert cfg.position_embedding == "rope"
    # As built, the family differs from the paper's convention by exactly its shape choices:
    # a second vocabulary matrix (the untied head) and norms, and no relative-position
    # projection (RoPE has no weights).
    counts = scaling.count_params(cfg)
    d, layers, hk = r["d_model"], r["n_layers"], r["n_heads"] * r["kv_size"]
    assert counts["total"] - counts["chinchilla"] == \
        32000 * d + (2 * layers + 1) * d - layers * d * hk


def _paper_formula(r: dict[str, int]) -> int:
    """Hoffmann et al.'s count: per layer 4 attention projections + 1 relative-position
    projection (d x heads x kv_size each) + 2 MLP matrices (d x ffw), plus one V x d matrix."""
    d, hk = r["d_model"], r["n_heads"] * r["kv_size"]
    return r["n_layers"] * (5 * d * hk + 2 * d * r["ffw_size"]) + 32000 * d


def test_paper_convention_reproduces_every_published_row():
    for r in _published_rows():
        c = _load("chinchilla", f"size={r['params_million']}")
        cfg = config_lib.model_config(c)
        n = scaling.param_count(cfg, "chinchilla")
        assert n == scaling.count_params(cfg)["chinchilla"] == _paper_formula(r)
        assert abs(n / (r["params_million"] * 1e6) - 1) < 0.01, r
    cfg = config_lib.model_config(_load("chinchilla", "size=1018"))
    assert round(scaling.param_count(cfg) / 1e6, 1) == 1017.5


def test_counter_reports_the_paper_convention_next_to_as_built():
    from jaxlm.tools import scaling as scaling_tool

    c = _load("chinchilla", "size=1018")
    counts = scaling_tool.count(c)
    cfg = config_lib.model_config(c)
    assert counts["conventions"]["chinchilla"] == _paper_formula(chinchilla.row(1018))
    assert counts["conventions"]["total"] == counts["params"]["total"]
    assert counts["conventions"]["non_embedding"] == counts["params"]["non_embedding"]
    # Kaplan et al.: 2 d n_layer (2 d_attn + d_ff) for this MHA GELU model.
    assert counts["conventions"]["kaplan"] == 2 * 1792 * 23 * (2 * 1792 + 7168)
    b = counts["budget"]
    assert b["param_convention"] == "chinchilla" and b["N"] == scaling.param_count(cfg)
    assert b["tokens_per_param"] == pytest.approx(b["tokens"] / b["N"])
    report = scaling_tool.format_report(counts)
    assert "chinchilla" in report and f"{b['N']:,}" in report


def test_chinchilla_1b_is_the_1018m_row_of_the_family():
    one_b, family = _load("chinchilla_1b"), _load("chinchilla", "size=1018")
    assert config_lib.model_config(one_b) == config_lib.model_config(family)
    assert family.train.steps == 0
    # Its fixed step count is the family's 20 tokens per parameter (the paper's convention).
    model_cfg = config_lib.model_config(family)
    assert one_b.train.steps == config_lib.resolve_steps(family, model_cfg).train.steps


def test_unknown_size_is_named():
    with pytest.raises(ValueError, match="size: 1000 is not a Table A9 row"):
        _load("chinchilla", "size=1000")


def test_tokens_per_param_default_is_20_and_becomes_steps():
    c = _load("chinchilla", "size=44")
    cfg = config_lib.model_config(c)
    assert c.train.param_convention == "chinchilla"
    n = _paper_formula(chinchilla.row(44))
    steps = config_lib.resolve_steps(c, cfg).train.steps
    assert steps == math.ceil(20 * n / (256 * 2048))
    assert c.train.steps == 0  # the input config is not modified
    # Explicitly unset everything: still 20 tokens per parameter.
    c.train.tokens_per_param = 0.0
    assert config_lib.resolve_steps(c, cfg).train.steps == steps
    c.train.tokens_per_param = 10.0
    assert config_lib.resolve_steps(c, cfg).train.steps == math.ceil(10 * n / (256 * 2048))
    # Another convention, named by the config.
    counts = scaling.count_params(cfg)
    for convention in ("total", "non_embedding", "kaplan"):
        c.train.param_convention = convention
        assert config_lib.resolve_steps(c, cfg).train.steps == \
            math.ceil(10 * counts[convention] / (256 * 2048))
    c.train.param_convention = "paper"
    with pytest.raises(ValueError, match="config key train.param_convention: 'paper'"):
        config_lib.resolve_steps(c, cfg)


def test_token_budget_and_steps():
    c = _load("chinchilla", "size=44,tokens=1000000000")
    cfg = config_lib.model_config(c)
    assert config_lib.resolve_steps(c, cfg).train.steps == math.ceil(1e9 / (256 * 2048))
    c = _load("chinchilla", "size=44,steps=7")
    assert config_lib.resolve_steps(c, cfg).train.steps == 7
    c.train.tokens = 5
    with pytest.raises(ValueError, match="config key train.tokens: 5 conflicts with "
                                         "train.steps=7"):
        config_lib.resolve_steps(c, cfg)


def test_trainer_schedule_follows_the_token_budget(tmp_path):
    from jaxlm.run import trainer

    c = config_lib.base_config()
    c.model.num_layers, c.model.d_model, c.model.d_ff, c.model.vocab_size = 1, 32, 64, 400
    c.data.seq_len, c.data.vocab_size, c.data.max_documents = 16, 400, 60
    c.data.cache_dir = str(tmp_path / "cache")
    c.train.global_batch_size, c.train.steps, c.train.tokens = 8, 0, 8 * 16 * 5 - 3
    s = trainer.setup(c, str(tmp_path / "run"))
    assert s.config.train.steps == 5
