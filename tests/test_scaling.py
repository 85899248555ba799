"""Parameter counts against the initialised model; FLOP counts against XLA's cost analysis."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from jaxlm.models import ModelConfig, MoeConfig, Transformer
from jaxlm.run import config as config_lib
from jaxlm.scaling import flops as scaling
from jaxlm.tools import scaling as scaling_tool

LLAMA = ModelConfig(vocab_size=250, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=8, d_ff=64, max_seq_len=16)
GPT2 = ModelConfig(vocab_size=250, d_model=32, num_layers=3, num_heads=4, num_kv_heads=4,
                   head_dim=8, d_ff=64, max_seq_len=16, position_embedding="learned",
                   norm="layernorm", mlp_activation="gelu", use_bias=True, tie_embeddings=True)
VARIANTS = {
    "llama_gqa_untied": LLAMA,
    "mqa": dataclasses.replace(LLAMA, num_kv_heads=1),
    "tied": dataclasses.replace(LLAMA, tie_embeddings=True),
    "gpt2": GPT2,
    "gpt2_untied_head_dim_not_d_over_h": dataclasses.replace(GPT2, tie_embeddings=False,
                                                            head_dim=12, vocab_size=256),
    "moe_top2": dataclasses.replace(LLAMA, moe=MoeConfig(num_experts=4, top_k=2)),
    "gpt2_moe_every_3rd": dataclasses.replace(GPT2, moe=MoeConfig(num_experts=3, top_k=1,
                                                                  every=3)),
    # Gemma 3 style: GeGLU (three matrices), norms after attention and MLP, q/k norms.
    "gemma3": dataclasses.replace(LLAMA, mlp_activation="geglu", post_norms=True, qk_norm=True,
                                  norm_plus_one=True, embed_scale=True, tie_embeddings=True),
}


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """'/'-joined parameter path -> shape, without allocating anything."""
    tokens_BxL = jnp.zeros((1, 8), jnp.int32)
    params = meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens_BxL))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape for path, leaf in flat}


def _component(path: str) -> str:
    name = path.split("/")[-1]
    if name == "embed":
        return "token_embedding"
    if name == "pos_embed":
        return "position_embedding"
    if name in ("head", "reward_head"):
        return name
    if "norm" in path:
        return "norms"
    if "/attn/" in path:
        return "attention"
    if "/mlp/" in path or "/moe/" in path:
        return "mlp"
    raise AssertionError(f"parameter {path} has no component")


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_count_params_matches_initialised_model(name: str, scan_layers: bool) -> None:
    cfg = dataclasses.replace(VARIANTS[name], scan_layers=scan_layers)
    shapes = _param_shapes(cfg)
    actual = {}
    for path, shape in shapes.items():
        actual[_component(path)] = actual.get(_component(path), 0) + int(np.prod(shape))
    counts = scaling.count_params(cfg)
    assert counts["total"] == sum(actual.values())
    for component in ("token_embedding", "position_embedding", "attention", "mlp", "norms",
                      "head"):
        assert counts[component] == actual.get(component, 0), component
    assert counts["embedding"] == counts["token_embedding"] + counts["position_embedding"]
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]


def test_count_params_conventions() -> None:
    counts = scaling.count_params(LLAMA)
    assert counts["token_embedding"] == 256 * 32  # vocab 250 padded to 256
    assert counts["head"] == 32 * 256  # the untied head is non-embedding
    assert counts["non_embedding"] == (counts["attention"] + counts["mlp"] + counts["norms"]
                                       + counts["head"])
    tied = scaling.count_params(dataclasses.replace(LLAMA, tie_embeddings=True))
    assert tied["head"] == 0 and tied["total"] == counts["total"] - 32 * 256
    assert scaling.count_params(GPT2)["position_embedding"] == 16 * 32


def test_flops_per_token_terms() -> None:
    d, h, n, k, f, layers, seq = 32, 4, 2, 8, 64, 3, 16
    flops = scaling.flops_per_token(LLAMA, seq)
    assert flops["embedding"] == 0
    assert flops["qkv_projections"] == layers * 2 * d * (h + 2 * n) * k
    assert flops["attention_logits"] == flops["attention_values"] == layers * 2 * seq * h * k
    assert flops["output_projection"] == layers * 2 * h * k * d
    assert flops["mlp"] == layers * 3 * 2 * d * f  # SwiGLU: three matrices
    assert flops["head"] == 2 * d * 256  # padded vocabulary
    terms = ("embedding", "qkv_projections", "attention_logits", "attention_values",
             "output_projection", "mlp", "head")
    assert flops["forward"] == sum(flops[t] for t in terms)
    assert flops["train"] == 3 * flops["forward"]
    params = scaling.count_params(LLAMA)
    assert flops["approx_6n"] == 6 * params["non_embedding"]
    assert flops["approx_6n_total"] == 6 * params["total"]
    # Without attention scores and norms, the forward count is exactly 2 x matmul params.
    matmul_params = params["attention"] + params["mlp"] + params["head"]
    assert flops["forward"] - flops["attention_logits"] - flops["attention_values"] == \
        2 * matmul_params
    assert scaling.flops_per_token(GPT2, seq)["mlp"] == layers * 2 * 2 * d * f  # GELU: two


def test_moe_active_params_and_flops() -> None:
    d, f, layers, seq, experts = 32, 64, 3, 16, 4
    cfg = VARIANTS["moe_top2"]
    counts, dense = scaling.count_params(cfg), scaling.count_params(LLAMA)
    expert_params = 3 * d * f  # SwiGLU
    assert counts["mlp"] == layers * (experts * expert_params + d * experts)
    assert counts["total"] - counts["active"] == layers * (experts - 2) * expert_params
    assert counts["non_embedding"] - counts["active_non_embedding"] == \
        counts["total"] - counts["active"]
    assert dense["active"] == dense["total"]
    flops = scaling.flops_per_token(cfg, seq)
    assert flops["mlp"] == layers * (2 * 2 * expert_params + 2 * d * experts)
    assert flops["approx_6n"] == 6 * counts["active_non_embedding"]
    # forward matmul FLOPs are 2 x the parameters one token actually multiplies with
    assert flops["forward"] - flops["attention_logits"] - flops["attention_values"] == \
        2 * (counts["active_non_embedding"] - counts["norms"])


def test_flops_per_step_and_errors() -> None:
    per_token = scaling.flops_per_token(LLAMA, 16)["train"]
    assert scaling.flops_per_step(LLAMA, 16, 8) == per_token * 16 * 8
    with pytest.raises(ValueError, match="global_batch_size"):
        scaling.flops_per_step(LLAMA, 16, 0)
    with pytest.raises(ValueError, match="seq_len"):
        scaling.flops_per_token(LLAMA, 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        scaling.flops_per_token(GPT2, 17)
    scaling.flops_per_token(LLAMA, 32)  # rope has no position table to outgrow


@functools.cache
def _xla_forward_flops(cfg: ModelConfig, seq_len: int) -> float:
    """XLA's FLOP count of one forward pass over a [1, seq_len] batch, compiled for CPU.

    CPU whatever the default backend: on GPU the matmuls become cuBLAS calls that the cost
    analysis does not count.
    """
    model = Transformer(cfg)
    on_cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    tokens_BxL = jax.ShapeDtypeStruct((1, seq_len), jnp.int32, sharding=on_cpu)
    params = meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens_BxL))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_cpu),
                          params)
    cost = jax.jit(model.apply).lower(params, tokens_BxL).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older jax
    return float(cost["flops"])


# Unrolled layers: XLA's cost analysis counts a scanned (while-loop) body only once.
XLA_BASE = ModelConfig(vocab_size=1000, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=64, d_ff=768, max_seq_len=128, scan_layers=False,
                       attention="xla")  # charged over the full L x L, as the convention
XLA_GPT2 = dataclasses.replace(XLA_BASE, num_kv_heads=4, d_ff=1024, position_embedding="learned",
                               norm="layernorm", mlp_activation="gelu", use_bias=True,
                               tie_embeddings=True)


@pytest.mark.parametrize("cfg", [XLA_BASE, XLA_GPT2], ids=["llama", "gpt2"])
def test_forward_flops_match_xla_cost_analysis(cfg: ModelConfig) -> None:
    seq = 128
    predicted = scaling.flops_per_token(cfg, seq)["forward"] * seq
    # XLA also counts elementwise work (softmax, norms, activations): a percent or two here.
    assert _xla_forward_flops(cfg, seq) == pytest.approx(predicted, rel=0.05)


def test_attention_charged_over_full_sequence() -> None:
    """XLA's extra work per token from 64 to 128 tokens is the full-L (not causal L/2) term."""
    extra_xla = _xla_forward_flops(XLA_BASE, 128) / 128 - _xla_forward_flops(XLA_BASE, 64) / 64
    ours = scaling.flops_per_token(XLA_BASE, 128)
    ours_64 = scaling.flops_per_token(XLA_BASE, 64)
    extra_ours = ours["forward"] - ours_64["forward"]
    assert extra_ours == 2 * 2 * 64 * 4 * 64 * 2  # 2 matmuls x 2 FLOPs x dL x H x K x layers
    assert extra_xla == pytest.approx(extra_ours, rel=0.1)


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.py"))


def _load_config(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(None)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.stem)
def test_count_params_of_every_shipped_config_is_its_initialised_size(path: Path) -> None:
    c = _load_config(path)
    cfg = config_lib.model_config(c, vocab_size=c.data.vocab_size)
    actual: dict[str, int] = {}
    for name, shape in _param_shapes(cfg).items():  # jax.eval_shape: nothing is allocated
        actual[_component(name)] = actual.get(_component(name), 0) + int(np.prod(shape))
    counts = scaling.count_params(cfg)
    assert counts["total"] == sum(actual.values())
    for component, size in actual.items():
        assert counts[component] == size, component


def test_count_tool_reports_the_library_numbers() -> None:
    path = next(p for p in SHIPPED_CONFIGS if p.stem == "chinchilla_1b")
    c = _load_config(path)
    counts = scaling_tool.count(c)
    cfg = config_lib.model_config(c)
    assert counts["params"] == scaling.count_params(cfg)
    assert counts["flops_per_token"] == scaling.flops_per_token(cfg, 2048)
    tokens = c.train.steps * 256 * 2048
    assert counts["budget"]["tokens"] == tokens
    # 6 N D with N under the run's train.param_convention (default: the paper's).
    n = scaling.param_count(cfg, c.train.param_convention)
    assert counts["budget"]["N"] == n == counts["params"]["chinchilla"]
    assert counts["budget"]["train_flops_6nd"] == 6 * n * tokens
    out = subprocess.run([sys.executable, "-m", "jaxlm.tools.scaling", "count",
                          f"--config={path}"], capture_output=True, text=True, check=True).stdout
    assert f"{counts['params']['total']:,}" in out
    assert f"{counts['params']['non_embedding']:,}" in out
    assert f"{counts['params']['chinchilla']:,}" in out
    assert f"{counts['flops_per_token']['train']:.4g}" in out
