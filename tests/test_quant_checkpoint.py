"""Quantized checkpoints: `jaxlm.tools.quantize` writes the QArray tree, the inference loader
restores exactly that tree, and the KV-cache sampler decodes it as greedy full recomputation
of the quantized model does; `--quantize` after loading gives the same model."""

import io
import json

import jax
import numpy as np
import pytest

from jaxlm.inference.sampler import Request, Sampler
from jaxlm.models import Transformer
from jaxlm.models.quant import quantizer
from jaxlm.models.quant.convert import quantize_loaded
from jaxlm.run import trainer
from jaxlm.tools import generate
from jaxlm.tools.quantize import quantize_checkpoint
from jaxlm.weights.restore import restore
from tests.cli import run_cli
from tests.greedy_reference import make_greedy_sampler
from tests.run_fixtures import tiny_run_config

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    trainer.run(tiny_run_config(tmp, num_layers=2, seq_len=16), str(tmp / "run"))
    return tmp / "run"


def _leaves(params):
    return jax.tree_util.tree_flatten_with_path(params, is_leaf=quantizer.is_qarray)[0]


@pytest.mark.parametrize("preset,tile,value_dtype", [("int4", 16, "int4"), ("nf4", 16, "uint8"),
                                                     ("int8_dynamic", 0, "int8")])
def test_saved_tree_restores_bitwise_and_decodes_with_the_kv_cache(run_dir, tmp_path, preset,
                                                                     tile, value_dtype):
    out = tmp_path / preset
    quantize_checkpoint(str(run_dir), str(out), preset, tile)
    restored = restore(str(out))
    written = quantize_loaded(restore(str(run_dir)), preset, tile)
    assert restored.model_cfg.quant == written.model_cfg.quant
    assert restored.model_cfg.quant.mode == "ptq" and restored.step == written.step
    got, want = _leaves(restored.params), _leaves(written.params)
    assert [p for p, _ in got] == [p for p, _ in want]
    n_quantized = 0
    for (path, a), (_, b) in zip(got, want):
        assert quantizer.is_qarray(a) == quantizer.is_qarray(b), path
        if quantizer.is_qarray(a):
            n_quantized += 1
            assert a.qtype == b.qtype and a.qvalue.dtype.name == value_dtype, path
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                     a, b)
    assert n_quantized == 8  # q, k, v, o, w_in, w_gate, w_out (stacked) and the head
    # KV-cache decoding of the restored model == greedy full recomputation of the written one
    tok = restored.tokenizer
    prompt = [tok.bos_id] + tok.encode("def ")
    expected = make_greedy_sampler(Transformer(written.model_cfg), len(prompt) + 6)(
        written.params, prompt)
    (completion,) = Sampler(restored.model_cfg, restored.params).generate(
        [Request(prompt, max_new_tokens=6)])
    assert completion.tokens == expected[:len(completion.tokens)]
    assert len(completion.tokens) == 6 or completion.stopped
    assert quantizer.param_bytes(restored.params) < quantizer.param_bytes(
        restore(str(run_dir)).params)


def test_cli_writes_a_checkpoint_generate_loads(run_dir, tmp_path):
    out = tmp_path / "int8"
    run_cli("jaxlm.tools.quantize", f"--workdir={run_dir}", "--quantize=int8", f"--out={out}",
            timeout=300)
    # generating from it == generating from the float run with --quantize=int8
    rows = []
    for opts in (generate.Options(workdir=str(out), prompts=("def ",), max_new_tokens=6,
                                  json=True),
                 generate.Options(workdir=str(run_dir), prompts=("def ",), max_new_tokens=6,
                                  json=True, quantize="int8")):
        buf = io.StringIO()
        generate.run(opts, stdout=buf)
        rows.append(json.loads(buf.getvalue().strip().splitlines()[-1]))
    assert rows[0]["token_ids"] == rows[1]["token_ids"]


def test_an_already_quantized_checkpoint_is_not_quantized_again(run_dir, tmp_path):
    out = tmp_path / "int8"
    quantize_checkpoint(str(run_dir), str(out), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_loaded(restore(str(out)), "int4")
