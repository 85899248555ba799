"""jaxlm/tools/convert_hf.py import: one jaxlm param group in memory at a time, written atomically.

The HF directories are written tensor by tensor with `safetensors_io.write_model` from seeded
random arrays (no torch, nothing downloaded).
"""

import json
import os
import tracemalloc

import jax
import numpy as np
import pytest

from jaxlm.run import checkpoint as ckpt_lib
from jaxlm.run import config as config_lib
from jaxlm.weights import restore
from jaxlm.weights.hf import config as hf_config
from jaxlm.weights.hf import convert as hf
from jaxlm.weights.hf import safetensors_io
from jaxlm.weights.hf import tensors as hf_weights

# 8 stacked layers and an untied head: 11.5 MiB of float32 params, while the largest HF tensor
# and the largest param group (the 2 MiB embedding / head / stacked w_*) are 2 MiB each.
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 4096,
         "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 8,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
         "hidden_act": "silu", "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "tie_word_embeddings": False}
# Python objects that orbax, tensorstore's bindings and the converter allocate during an import
# (measured 0.4 MiB).
MARGIN_BYTES = 2**20


def _write_hf(hf_dir, hf_json):
    """Random float32 weights for `hf_json` in 3 MB shards; returns them by HF name."""
    os.makedirs(hf_dir)
    cfg = config_lib.model_config(hf.run_config(hf_config.model_fields(hf_json), "float32"))
    entries = [(m.name, m.shape) for m in hf_weights.tensor_maps(cfg)]
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in entries}
    safetensors_io.write_model(hf_dir, entries, tensors.__getitem__, np.float32, 3_000_000)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_json, f)
    return cfg, tensors


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    hf_dir = str(tmp_path_factory.mktemp("hf") / "llama")
    cfg, tensors = _write_hf(hf_dir, LLAMA)
    return hf_dir, cfg, tensors


def test_import_holds_one_param_group_not_the_model(llama_dir, tmp_path):
    """Peak bytes allocated by Python and numpy during the import <= largest param group +
    largest HF tensor + margin, on a model 2.9x larger than that; the checkpoint is exact.

    tracemalloc counts what the process allocates (numpy reports its array buffers to it)
    rather than what the OS has resident, so the figure is the same on a loaded shared machine
    and does not depend on when the allocator returns freed memory; tensorstore's own C++
    buffers are not in it (benchmarks/hf_conversion_memory.py measures the RSS with them)."""
    hf_dir, cfg, tensors = llama_dir
    model_bytes = sum(t.nbytes for t in tensors.values())
    bound = hf.largest_group_bytes(cfg) + max(t.nbytes for t in tensors.values()) + MARGIN_BYTES
    assert model_bytes > 2 * bound  # holding the whole output would fail the check below
    hf.import_hf(hf_dir, str(tmp_path / "warm"))  # imports, jit caches: not part of the peak
    tracemalloc.start()
    try:
        hf.import_hf(hf_dir, str(tmp_path / "jx"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= bound, (f"import peak {peak / 2**20:.2f} MiB > bound {bound / 2**20:.2f} "
                           f"MiB (model {model_bytes / 2**20:.2f} MiB)")

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            hf.abstract_params(cfg))
    params = jax.device_get(restore.restore(str(tmp_path / "jx"), model_cfg=cfg,
                                            abstract_params=abstract).params)
    w_in = tensors["model.layers.5.mlp.up_proj.weight"]
    np.testing.assert_array_equal(params["blocks"]["mlp"]["w_in"][5], w_in.T)
    np.testing.assert_array_equal(params["embed"], tensors["model.embed_tokens.weight"])
    hf.export_hf(str(tmp_path / "jx"), str(tmp_path / "back"))
    back = {}
    for name in os.listdir(tmp_path / "back"):
        if name.endswith(".safetensors"):
            back.update({n: safetensors_io.read_tensor(str(tmp_path / "back" / name), n)
                         for n, *_ in safetensors_io.tensor_index(
                             [str(tmp_path / "back" / name)])})
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(back[name], tensor, err_msg=name)


def test_a_failed_import_leaves_no_output(llama_dir, tmp_path, monkeypatch):
    """A read that fails half-way through the save raises and leaves neither the output
    directory nor its partial copy; a rerun needs no --overwrite."""
    hf_dir, _, _ = llama_dir
    read, calls = safetensors_io.read_tensor, []

    def failing_read(path, name):
        calls.append(name)
        if len(calls) == 20:
            raise OSError("read error")
        return read(path, name)

    monkeypatch.setattr(safetensors_io, "read_tensor", failing_read)
    out = tmp_path / "jx"
    with pytest.raises(OSError, match="read error"):
        hf.import_hf(hf_dir, str(out))
    assert len(calls) == 20 and not out.exists()
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(safetensors_io, "read_tensor", read)
    hf.import_hf(hf_dir, str(out))
    assert ckpt_lib.complete_steps(str(out / hf.CHECKPOINTS)) == [hf.IMPORT_STEP]


def test_param_groups_join_params_filled_by_one_tensor():
    """GPT-2's c_attn fills q, k and v: one group; every param is in exactly one group."""
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 300,
            "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 48}
    cfg = config_lib.model_config(hf.run_config(hf_config.model_fields(gpt2), "float32"))
    groups = [leaves for leaves, _ in hf.param_groups(cfg)]
    qkv = {("blocks", "attn", w) for w in ("wq", "wk", "wv")}
    assert qkv in groups
    names = [p for leaves in groups for p in leaves]
    flat = jax.tree_util.tree_flatten_with_path(hf.abstract_params(cfg))[0]
    assert sorted(names) == sorted(tuple(k.key for k in path) for path, _ in flat)
