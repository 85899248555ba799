"""The `model` section of a run config: every architecture key with its default, its checks,
and `model_config`, the one place where the section becomes a typed `ModelConfig`.

Every `model.*` key is a `ModelConfig` field of the same name and default (tests/test_config.py
checks it), or one of `DERIVED_MODEL_KEYS`: 0-valued sizes derived here and the nested sections
`moe`, `lora` and `rope_scaling`, whose keys are those of `MoeConfig`, the `lora_*` fields and
`RopeScaling`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxlm.models.config import ModelConfig, MoeConfig
from jaxlm.models.lora import ATTENTION_TARGETS, MLP_TARGETS
from jaxlm.models.quant.settings import quant_spec
from jaxlm.models.rope import RopeScaling
from jaxlm.run import errors
from jaxlm.run.section import Section


def default_model_config() -> ml_collections.ConfigDict:
    """The `model` section with its defaults."""
    m = ml_collections.ConfigDict()
    # Vocabulary size; 0 = take it from the tokenizer. Embeddings pad it to a multiple of 128.
    # The model's own size (embedding rows, logits); a trained tokenizer's is data.vocab_size.
    m.vocab_size = 0
    # Residual stream width.
    m.d_model = 256
    # Number of transformer blocks.
    m.num_layers = 4
    # Query heads.
    m.num_heads = 4
    # Key/value heads; 0 = num_heads (MHA); 1 = MQA; otherwise GQA.
    m.num_kv_heads = 0
    # Width of one head; 0 = d_model // num_heads (then num_heads must divide d_model).
    m.head_dim = 0
    # MLP hidden width; 0 = 4 * d_model.
    m.d_ff = 0
    # Longest sequence; 0 = data.seq_len.
    m.max_seq_len = 0
    # "rope" (Llama) or "learned" (GPT-2).
    m.position_embedding = "rope"
    # "rmsnorm" (Llama) or "layernorm" (GPT-2).
    m.norm = "rmsnorm"
    # "swiglu" (Llama), "geglu" (Gemma) or "gelu" (GPT-2).
    m.mlp_activation = "swiglu"
    # Biases on dense layers (GPT-2).
    m.use_bias = False
    # Biases on the query/key/value projections only (Qwen2); implied by use_bias.
    m.qkv_bias = False
    # Share input embedding and output head.
    m.tie_embeddings = False
    # RoPE base frequency.
    m.rope_theta = 10000.0
    # RoPE context extension (jaxlm/models/rope.py, docs/hf.md); kind "none" = plain RoPE.
    m.rope_scaling = rs = ml_collections.ConfigDict()
    # "none", "linear", "dynamic" (NTK), "llama3" or "yarn".
    rs.kind = "none"
    # Context extension factor.
    rs.factor = 1.0
    # Pretraining context length (llama3, yarn; dynamic: where the base starts to grow).
    rs.original_max_len = 0
    # llama3: wavelengths above original_max_len / low_freq_factor are divided by factor, those
    # below original_max_len / high_freq_factor kept, a smooth ramp between.
    rs.low_freq_factor = 1.0
    rs.high_freq_factor = 4.0
    # yarn: ramp bounds in rotations over original_max_len, cos/sin scale (0 = 0.1 ln f + 1),
    # and whether the ramp bounds are rounded to integers.
    rs.beta_fast = 32.0
    rs.beta_slow = 1.0
    rs.attention_factor = 0.0
    rs.truncate = True
    # Sliding-window attention: a query sees the last sliding_window tokens (0 = all).
    m.sliding_window = 0
    # With a window, every this-many-th layer attends globally (0 = none; Gemma 2: 2, 3: 6).
    m.global_every = 0
    # RoPE base of the sliding-window layers (Gemma 3: 10000); 0 = the global layers' RoPE.
    m.rope_local_theta = 0.0
    # Gemma: RMSNorm scales by (1 + scale); norms on the attention and MLP outputs too; RMSNorm
    # on queries and keys (Gemma 3); scores scaled by attn_scale_dim^-1/2 (0 = head_dim);
    # embeddings multiplied by sqrt(d_model).
    m.norm_plus_one = False
    m.post_norms = False
    m.qk_norm = False
    m.attn_scale_dim = 0.0
    m.embed_scale = False
    # Logit soft-capping C * tanh(x / C) (Gemma 2; 0 = off): of the attention scores (after
    # scaling, before masking) and of the vocab logits.
    m.attn_logit_softcap = 0.0
    m.final_logit_softcap = 0.0
    # Norm epsilon.
    m.norm_eps = 1e-5
    # Stored parameter dtype.
    m.param_dtype = "float32"
    # Matmul/activation dtype: float32 on CPU, bfloat16 on TPU/GPU. Logits and loss are float32.
    m.compute_dtype = "float32"
    # Rematerialisation of each block: "none", "full", "save_dots".
    m.remat = "none"
    # Run blocks with scan over stacked parameters (compile time independent of depth).
    m.scan_layers = True
    # Attention implementation: "auto" (the platform's kernel), "xla", "blocked", "chunked",
    # "cudnn" or "splash" (docs/attention_and_fit_check.md).
    m.attention = "auto"
    # Std of the normal initialiser of weight matrices.
    m.init_std = 0.02
    # KV cache of decoding (generation, RL rollouts, evals): "" = k and v in the compute dtype;
    # "int8" = int8 with a float32 scale per slot and kv head (docs/inference.md).
    m.kv_cache_dtype = ""
    # LoRA adapters (docs/post_training.md): only they are trained when rank > 0.
    m.lora = lo = ml_collections.ConfigDict()
    # Adapter rank; 0 = no adapters (full fine-tuning).
    lo.rank = 0
    # Adapters are scaled by alpha / rank.
    lo.alpha = 16.0
    # Also adapt the MLP weights (attention wq/wk/wv/wo always are).
    lo.mlp = False
    # Dropout rate on the adapters' inputs during training (the LoRA paper's 0.05-0.1).
    lo.dropout = 0.0
    # Mixture of experts (docs/moe.md); num_experts = 0 keeps every MLP dense.
    m.moe = mo = ml_collections.ConfigDict()
    # Experts per MoE block (each of width model.d_ff); shard them with mesh.expert.
    mo.num_experts = 0
    # Experts per token: 1 (Switch) or 2 (GShard / Mixtral).
    mo.top_k = 2
    # Slots per expert and sequence = ceil(capacity_factor * top_k * seq_len / num_experts).
    mo.capacity_factor = 1.25
    # Give every expert seq_len slots so no token is ever dropped.
    mo.dropless = False
    # Every this-many-th block is MoE (1: all blocks; 2: every other block).
    mo.every = 1
    # Weight of the load-balancing loss (Switch Transformer) in the training loss.
    mo.aux_loss_weight = 0.01
    # Weight of the router z-loss (ST-MoE) in the training loss.
    mo.router_z_loss_weight = 0.001
    return m


# `model.*` keys that are not a ModelConfig field of the same name and meaning: 0 = "derive it"
# sizes, and the sections `moe`, `lora`, `rope_scaling` (every other model key is copied as is).
DERIVED_MODEL_KEYS = ("vocab_size", "num_kv_heads", "head_dim", "d_ff", "max_seq_len", "moe",
                      "lora", "rope_scaling")
# `model.lora.*` key -> the ModelConfig field it sets (`mlp` widens lora_targets).
LORA_FIELDS = {"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
               "mlp": "lora_targets"}


def _fail(key: str, msg: str) -> None:
    raise errors.config_error(key, msg)


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
    """The typed model config, with 0-valued sizes resolved. Raises naming `model.*` keys."""
    from jaxlm.stages import get_stage  # the stage decides the head; imported when called

    m = config.model
    vocab = m.vocab_size or vocab_size
    if not vocab:
        _fail("model.vocab_size", "is 0 and no tokenizer vocabulary was given")
    if m.head_dim == 0 and m.d_model % m.num_heads:
        _fail("model.num_heads", f"{m.num_heads} heads do not divide model.d_model={m.d_model}; "
              "change one of them or set model.head_dim explicitly")
    # Keys named like a ModelConfig field are that field (a saved config of an older version
    # that lacks a newer key gets the field's default); the rest are resolved here.
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    same = {k: m[k] for k in m.keys() if k in fields and k not in DERIVED_MODEL_KEYS}
    cfg = ModelConfig(
        **same, vocab_size=vocab, num_kv_heads=m.num_kv_heads or m.num_heads,
        head_dim=m.head_dim or m.d_model // m.num_heads, d_ff=m.d_ff or 4 * m.d_model,
        max_seq_len=m.max_seq_len or config.data.seq_len,
        pipeline_stages=max(config.mesh.pipeline, 1),
        pipeline_microbatches=max(config.train.pipeline_microbatches, 1),
        pipeline_repeats=max(config.train.pipeline_repeats, 1),
        moe=MoeConfig(**m.moe.to_dict()) if m.moe.num_experts else None,
        lora_rank=m.lora.rank, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
        lora_targets=ATTENTION_TARGETS + (MLP_TARGETS if m.lora.mlp else ()),
        reward_head=get_stage(config.stage).reward_head, quant=quant_spec(config),
        rope_scaling=RopeScaling(**m.rope_scaling.to_dict()) if "rope_scaling" in m
        else RopeScaling())
    cfg.check()
    return cfg


def check_model(config: ml_collections.ConfigDict) -> None:
    """The model builds from the section (ModelConfig.check names the key) and holds a
    sequence of data.seq_len."""
    model_config(config, vocab_size=config.model.vocab_size or 1)
    max_len = config.model.max_seq_len
    if max_len and max_len < config.data.seq_len:
        _fail("model.max_seq_len", f"{max_len} is shorter than data.seq_len={config.data.seq_len}")


MODEL = Section("model", default_model_config, check_model)
