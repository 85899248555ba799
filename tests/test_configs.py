"""Every shipped config loads, validates and builds its model config; Chinchilla is Table A9."""

import importlib.util
from pathlib import Path

import pytest

from jaxlm.run import config as config_lib
from jaxlm.scaling import flops as scaling

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path: Path, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "python " in (module.__doc__ or ""), f"{path.name}: docstring must show its command"
    return module.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_builds_a_model(path):
    c = _load(path)
    config_lib.validate(c)
    cfg = config_lib.model_config(c, vocab_size=c.data.vocab_size)
    counts = scaling.count_params(cfg)
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]
    assert counts["non_embedding"] == sum(counts[k] for k in ("attention", "mlp", "norms", "head",
                                                              "reward_head"))


@pytest.mark.parametrize("name,published", [
    # Hugging Face's parameter counts of the models these configs reproduce: GPT-2 small
    # (gpt2, tied embeddings) and Llama 3.2 1B (meta-llama/Llama-3.2-1B, tied embeddings).
    ("gpt2_124m", 124_439_808),
    ("llama_1b", 1_235_814_400),
])
def test_named_configs_have_the_published_parameter_count(name, published):
    c = _load(next(p for p in CONFIGS if p.stem == name))
    cfg = config_lib.model_config(c, vocab_size=c.data.vocab_size)
    counts = scaling.count_params(cfg)
    # jaxlm pads the embedding rows to a multiple of 128; the published count has vocab_size.
    rows = counts["token_embedding"] // cfg.d_model
    assert rows % 128 == 0 and 0 <= rows - cfg.vocab_size < 128
    assert counts["total"] - (rows - cfg.vocab_size) * cfg.d_model == published


def test_chinchilla_1b_is_table_a9_row_1018m():
    c = _load(next(p for p in CONFIGS if p.stem == "chinchilla_1b"))
    cfg = config_lib.model_config(c)
    assert (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.head_dim, cfg.num_layers) == \
        (1792, 7168, 14, 128, 23)
    assert (cfg.vocab_size, c.data.seq_len) == (32000, 2048)


def test_data_argument_selects_shards_or_raw_files():
    path = next(p for p in CONFIGS if p.stem == "gpt2_124m")
    shards = _load(path, "data=/d/train-*.array_record")
    raw = _load(path, "data=/d/train-*.jsonl,tokenizer=/t/sp.model")
    assert (shards.data.source, shards.data.paths) == ("arrayrecord", "/d/train-*.array_record")
    assert (raw.data.source, raw.data.tokenizer_path) == ("files", "/t/sp.model")
    assert _load(path).data.source == "stdlib"
