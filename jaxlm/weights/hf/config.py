"""Hugging Face `config.json` <-> the `model` section of a jaxlm run config.

Supported: Llama-family decoders (`model_type` llama, mistral, qwen2: RoPE with linear, dynamic,
llama3 or yarn scaling, RMSNorm, SwiGLU, grouped-query attention, Qwen2's q/k/v biases, sliding
windows), Gemma 2 / Gemma 3 text models (gemma2, gemma3_text: (1 + w) RMSNorms around attention
and MLP, GeGLU, query pre-attention scaling, alternating local/global layers, embeddings scaled
by sqrt(d), attention and final logit soft-capping; Gemma 3's q/k norms and local RoPE base) and
GPT-2. Anything in a config.json that would change the function the model computes and that
jaxlm does not implement (partial rotary embeddings, longrope, biases elsewhere, other
activations) is an error naming the config.json key, never silently dropped.
"""

from __future__ import annotations

import math
from typing import Any

from jaxlm.models.config import ModelConfig
from jaxlm.models.rope import RopeScaling, yarn_attention_factor
from jaxlm.run.errors import ConfigError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
GEMMA_FAMILY = ("gemma2", "gemma3_text")
GPT2 = "gpt2"
# GELU variants equal to jax.nn.gelu(approximate=True), the one jaxlm's GPT-2 MLP uses.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config.json key {key}: {msg}")


def _size(hf: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    """config.json's `key` as a positive integer (None when `optional` and absent or null)."""
    value = hf.get(key)
    if value is None and optional:
        return None
    if key not in hf:
        _fail(key, "missing; a size the model needs")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(key, f"{value!r}: a size is a positive integer")
    return value


def _refuse(hf: dict[str, Any], unsupported: dict[str, str]) -> None:
    """Fails on the first `config.json` key of `unsupported` that is set (truthy), with its
    message."""
    for key, msg in unsupported.items():
        if hf.get(key):
            _fail(key, msg)


# The config.json key of the number of layers, by family.
_LAYERS_KEY = {**{t: "num_hidden_layers" for t in LLAMA_FAMILY + GEMMA_FAMILY},
               GPT2: "n_layer"}


def model_fields(hf: dict[str, Any], num_tensors: int | None = None) -> dict[str, Any]:
    """The `model.*` values of a jaxlm run config that computes what `hf` (config.json) does.

    `num_tensors`: how many tensors the safetensors files hold; each layer has some, so a
    config.json with more layers is refused before anything is built for them."""
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json: a JSON object is expected, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type in _LAYERS_KEY:
        key = _LAYERS_KEY[model_type]
        layers = _size(hf, key)
        if num_tensors is not None and layers > num_tensors:
            _fail(key, f"{layers} layers, but the safetensors files hold only {num_tensors} "
                  "tensors")
    if model_type in LLAMA_FAMILY:
        return _llama_fields(hf)
    if model_type in GEMMA_FAMILY:
        return _gemma_fields(hf)
    if model_type == GPT2:
        return _gpt2_fields(hf)
    hint = " (a Gemma 3 checkpoint with vision: convert its text model, model_type " \
        "gemma3_text)" if model_type == "gemma3" else ""
    _fail("model_type", f"{model_type!r} is not supported{hint}; supported: "
          f"{', '.join(LLAMA_FAMILY + GEMMA_FAMILY + (GPT2,))}")
    raise AssertionError  # unreachable


_ROPE_KEYS = {  # HF rope parameter -> jaxlm `model.rope_scaling.*` key
    "factor": "factor", "original_max_position_embeddings": "original_max_len",
    "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
    "beta_fast": "beta_fast", "beta_slow": "beta_slow", "attention_factor": "attention_factor",
    "truncate": "truncate"}
_ROPE_IGNORED = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "mscale",
                 "mscale_all_dim")
_ROPE_KINDS = {"default": "none", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3",
               "yarn": "yarn"}


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` (a dict of `model.rope_scaling.*`) of config.json;
    transformers < 5 spells them rope_theta + rope_scaling, >= 5 rope_parameters."""
    params = dict(hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        _fail("rope_parameters", "per-layer-type RoPE parameters are not supported")
    key = "rope_parameters"
    if hf.get("rope_scaling") and params.get("rope_type", "default") == "default":
        params, key = {**params, **hf["rope_scaling"]}, "rope_scaling"
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_KINDS:
        _fail(f"{key}.rope_type", f"{kind!r} RoPE is not implemented; supported: "
              f"{', '.join(_ROPE_KINDS)}")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        _fail("partial_rotary_factor", "partial rotary embeddings are not implemented")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = {"kind": _ROPE_KINDS[kind]}
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": scaling}
    unknown = sorted(set(params) - set(_ROPE_KEYS) - set(_ROPE_IGNORED))
    if unknown:
        _fail(f"{key}.{unknown[0]}", f"not implemented for {kind!r} RoPE")
    for hf_key, jaxlm_key in _ROPE_KEYS.items():
        if params.get(hf_key) is not None:
            scaling[jaxlm_key] = type(getattr(RopeScaling(), jaxlm_key))(params[hf_key])
    max_len = hf.get("max_position_embeddings")
    if kind == "dynamic":  # transformers grows the base past max_position_embeddings
        scaling["original_max_len"] = int(max_len)
    elif "original_max_len" not in scaling:
        scaling["original_max_len"] = int(max_len)
    if kind == "yarn":
        if scaling.get("factor") is None:
            scaling["factor"] = max_len / scaling["original_max_len"]
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if not scaling.get("attention_factor") and mscale and mscale_all:
            ratio = lambda m: 1.0 if scaling["factor"] <= 1 else (
                0.1 * m * math.log(scaling["factor"]) + 1.0)
            scaling["attention_factor"] = float(ratio(mscale) / ratio(mscale_all))
    return {"rope_theta": theta, "rope_scaling": scaling}


def _hf_rope(cfg: ModelConfig) -> dict[str, Any]:
    """config.json's RoPE keys for `cfg` (both transformers spellings)."""
    s = cfg.rope_scaling
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if s.kind != "none":
        params = {"rope_type": s.kind, "rope_theta": cfg.rope_theta, "factor": s.factor}
        if s.kind == "llama3":
            params.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                          original_max_position_embeddings=s.original_max_len)
        elif s.kind == "yarn":
            params.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate,
                          original_max_position_embeddings=s.original_max_len,
                          attention_factor=yarn_attention_factor(s))
        elif s.kind == "dynamic" and s.original_max_len != cfg.max_seq_len:
            raise ConfigError("config key model.rope_scaling.original_max_len: transformers' "
                             "dynamic RoPE grows past max_position_embeddings, so it must equal "
                             f"model.max_seq_len={cfg.max_seq_len}; cannot export")
    scaling = None if s.kind == "none" else {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


def _windows(hf: dict[str, Any]) -> dict[str, int]:
    """`sliding_window` and `global_every` of config.json's sliding window and layer types
    (Mistral: every layer local; Qwen2: local from max_window_layers on, when
    use_sliding_window; Gemma: layer_types, every k-th layer global)."""
    n, max_len = hf["num_hidden_layers"], hf.get("max_position_embeddings")
    window = hf.get("sliding_window") or None  # 0 or null: no window
    if window is not None:
        _size(hf, "sliding_window")
    if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window"):
        window = None
    types = hf.get("layer_types")
    if types is None:
        first_local = hf.get("max_window_layers", 0) if hf.get("model_type") == "qwen2" else 0
        if isinstance(first_local, bool) or not isinstance(first_local, int):
            _fail("max_window_layers", f"{first_local!r}: a number of layers is an integer")
        types = ["sliding_attention" if window is not None and i >= first_local
                 else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n:
        _fail("layer_types", f"a list of one type per layer ({n}) is expected, got "
              f"{types if not isinstance(types, list) else f'{len(types)} entries'}")
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        _fail("layer_types", f"{sorted(unknown)}: only full_attention and sliding_attention "
              "layers are implemented")
    local = [t == "sliding_attention" for t in types]
    if not any(local) or not window:
        return {"sliding_window": 0, "global_every": 0}
    every = 0 if all(local) else local.index(False) + 1
    if any(local[i] != (every == 0 or (i + 1) % every != 0) for i in range(n)):
        key = "max_window_layers" if hf.get("model_type") == "qwen2" else "layer_types"
        _fail(key, f"local layers {[i for i in range(n) if local[i]]}: only every layer local, "
              "or every k-th layer global (the last of each group of k), is implemented")
    if every == 0 and max_len and window >= max_len:  # the window covers every position
        return {"sliding_window": 0, "global_every": 0}
    return {"sliding_window": int(window), "global_every": every}


def _llama_fields(hf: dict[str, Any]) -> dict[str, Any]:
    model_type = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        _fail("hidden_act", f"{hf['hidden_act']!r}: the Llama-family MLP is SwiGLU (silu)")
    _refuse(hf, {
        "attention_bias": "biases on all attention projections (including o_proj) are not "
                          "implemented; Qwen2's q/k/v-only biases are (model_type qwen2)",
        "mlp_bias": "MLP biases in a Llama-family model are not implemented"})
    d, heads = _size(hf, "hidden_size"), _size(hf, "num_attention_heads")
    return {
        "vocab_size": _size(hf, "vocab_size"), "d_model": d,
        "num_layers": _size(hf, "num_hidden_layers"), "num_heads": heads,
        "num_kv_heads": _size(hf, "num_key_value_heads", optional=True) or heads,
        "head_dim": _size(hf, "head_dim", optional=True) or d // heads,
        "d_ff": _size(hf, "intermediate_size"),
        "max_seq_len": _size(hf, "max_position_embeddings"), "position_embedding": "rope",
        "norm": "rmsnorm", "mlp_activation": "swiglu", "use_bias": False,
        "qkv_bias": model_type == "qwen2",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), **_rope(hf), **_windows(hf),
    }


def _gemma_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's global-layer RoPE and local-layer base (`rope_parameters` per layer type in
    transformers >= 5; rope_theta, rope_scaling and rope_local_base_freq before)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            _fail("rope_parameters.sliding_attention.rope_type", f"{local['rope_type']!r}: "
                  "only plain RoPE is implemented for sliding-window layers")
        out = _rope({**hf, "rope_parameters": params.get("full_attention") or {}})
        local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
    else:
        out = _rope(hf)
        local_theta = hf.get("rope_local_base_freq", out["rope_theta"])
    return {**out, "rope_local_theta": float(local_theta)}


def _gemma_fields(hf: dict[str, Any]) -> dict[str, Any]:
    model_type = hf["model_type"]
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _TANH_GELUS:
        _fail("hidden_activation", f"{act!r}: jaxlm's GeGLU uses the tanh GELU")
    caps = {}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        cap = hf.get(key)
        if cap is not None and not (isinstance(cap, (int, float)) and cap >= 0):
            _fail(key, f"{cap!r}: a soft-cap is a number >= 0 (or null: none)")
        caps[key] = float(cap or 0.0)
    _refuse(hf, {"attention_bias": "not implemented",
                 "use_bidirectional_attention": "not implemented"})
    d, heads = _size(hf, "hidden_size"), _size(hf, "num_attention_heads")
    head_dim = _size(hf, "head_dim", optional=True) or d // heads
    rope = _gemma_rope(hf) if model_type == "gemma3_text" else _rope(hf)
    return {
        "vocab_size": _size(hf, "vocab_size"), "d_model": d,
        "num_layers": _size(hf, "num_hidden_layers"), "num_heads": heads,
        "num_kv_heads": _size(hf, "num_key_value_heads", optional=True) or heads,
        "head_dim": head_dim, "d_ff": _size(hf, "intermediate_size"),
        "max_seq_len": _size(hf, "max_position_embeddings"), "position_embedding": "rope",
        "norm": "rmsnorm", "mlp_activation": "geglu", "use_bias": False, "qkv_bias": False,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), **rope, **_windows(hf),
        "norm_plus_one": True, "post_norms": True, "qk_norm": model_type == "gemma3_text",
        "attn_scale_dim": float(hf.get("query_pre_attn_scalar") or head_dim),
        "embed_scale": True, "attn_logit_softcap": caps["attn_logit_softcapping"],
        "final_logit_softcap": caps["final_logit_softcapping"],
    }


def _gpt2_fields(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        _fail("activation_function", f"{act!r}: jaxlm's GPT-2 MLP is the tanh GELU "
              f"({' / '.join(_TANH_GELUS)})")
    if not hf.get("scale_attn_weights", True):
        _fail("scale_attn_weights", "attention without 1/sqrt(head_dim) is not implemented")
    _refuse(hf, {"scale_attn_by_inverse_layer_idx": "per-layer attention scaling is not "
                                                    "implemented",
                 "add_cross_attention": "cross-attention is not implemented"})
    d, heads = _size(hf, "n_embd"), _size(hf, "n_head")
    if d % heads:
        _fail("n_head", f"{heads} does not divide n_embd={d}")
    return {
        "vocab_size": _size(hf, "vocab_size"), "d_model": d, "num_layers": _size(hf, "n_layer"),
        "num_heads": heads, "num_kv_heads": heads, "head_dim": d // heads,
        "d_ff": _size(hf, "n_inner", optional=True) or 4 * d,
        "max_seq_len": _size(hf, "n_positions"),
        "position_embedding": "learned", "norm": "layernorm", "mlp_activation": "gelu",
        "use_bias": True, "qkv_bias": False,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "rope_theta": 10000.0, "rope_scaling": {"kind": "none"},
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
    }


def family(cfg: ModelConfig) -> str:
    """The HF `model_type` that computes what `cfg` does (llama, qwen2 or gpt2); raises naming
    the `model.*` key that no supported HF architecture has."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"config key model.{key}: {msg}; cannot export to Hugging Face")

    if not cfg.post_norms:  # only the Gemma architectures soft-cap logits
        for key in ("attn_logit_softcap", "final_logit_softcap"):
            if getattr(cfg, key):
                fail(key, "logit soft-capping exists in the Gemma architectures (post_norms) "
                     "only")
    if cfg.position_embedding == "learned":
        for key, want in (("norm", "layernorm"), ("mlp_activation", "gelu"), ("use_bias", True)):
            if getattr(cfg, key) != want:
                fail(key, f"a GPT-2-style model (learned positions) needs {want!r}")
        if cfg.num_kv_heads != cfg.num_heads:
            fail("num_kv_heads", "GPT-2 has no grouped-query attention")
        if cfg.num_heads * cfg.head_dim != cfg.d_model:
            fail("head_dim", "GPT-2 needs num_heads * head_dim == d_model")
        return GPT2
    if cfg.post_norms:
        for key, want in (("norm", "rmsnorm"), ("mlp_activation", "geglu"), ("use_bias", False),
                          ("qkv_bias", False), ("norm_plus_one", True), ("embed_scale", True)):
            if getattr(cfg, key) != want:
                fail(key, f"a Gemma-style model (post_norms) needs {want!r}")
        return "gemma3_text" if cfg.qk_norm else "gemma2"
    for key, want in (("norm", "rmsnorm"), ("mlp_activation", "swiglu"), ("use_bias", False),
                      ("norm_plus_one", False), ("qk_norm", False), ("embed_scale", False),
                      ("attn_scale_dim", 0.0), ("rope_local_theta", 0.0)):
        if getattr(cfg, key) != want:
            fail(key, f"a Llama-style model (rope) needs {want!r}")
    if cfg.mixed_windows:
        fail("global_every", "no Llama-family HF architecture alternates local and global "
             "layers")
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def hf_config(cfg: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    """The config.json of the HF model that computes what `cfg` does (see `family`)."""
    kind = family(cfg)
    if kind == GPT2:
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": GPT2,
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
            "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.d_ff,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "scale_attn_weights": True, "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "torch_dtype": torch_dtype,
        }
    if kind in GEMMA_FAMILY:
        return _hf_gemma_config(cfg, kind, torch_dtype)
    architectures = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                     "llama": "LlamaForCausalLM"}
    out = {
        "architectures": [architectures[kind]],
        "model_type": kind, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta + rope_scaling, >= 5 rope_parameters.
        **_hf_rope(cfg),
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": torch_dtype,
    }
    window = cfg.sliding_window or None
    if kind == "qwen2":
        out.update(use_sliding_window=window is not None, sliding_window=window,
                   max_window_layers=0 if window else cfg.num_layers)
    elif kind == "mistral":
        out.update(sliding_window=window)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out


def _hf_gemma_config(cfg: ModelConfig, kind: str, torch_dtype: str) -> dict[str, Any]:
    layer_types = ["sliding_attention" if cfg.layer_window(i) else "full_attention"
                   for i in range(cfg.num_layers)]
    out = {
        "architectures": ["Gemma3ForCausalLM" if kind == "gemma3_text" else "Gemma2ForCausalLM"],
        "model_type": kind, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "query_pre_attn_scalar": _int_if_whole(cfg.attn_scale_dim or cfg.head_dim),
        "sliding_window": cfg.sliding_window or None, "layer_types": layer_types,
        "attn_logit_softcapping": cfg.attn_logit_softcap or None,
        "final_logit_softcapping": cfg.final_logit_softcap or None,
        "attention_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": torch_dtype, **_hf_rope(cfg),
    }
    if kind == "gemma3_text":
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        out["rope_local_base_freq"] = local_theta
        out["rope_parameters"] = {"full_attention": out["rope_parameters"],
                                  "sliding_attention": {"rope_type": "default",
                                                        "rope_theta": local_theta}}
    elif cfg.rope_local_theta and cfg.rope_local_theta != cfg.rope_theta:
        raise ConfigError("config key model.rope_local_theta: Gemma 2 uses one RoPE base for "
                         "every layer; cannot export")
    return out


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x
