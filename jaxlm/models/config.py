"""The typed model configuration that everything under `jaxlm/models/` receives.

`jaxlm/run/config.py` builds a `ModelConfig` from the `model` section of a run config; model code
never
reads a ConfigDict. Two families are expressed by field values, not by subclasses:

* Llama style: rope, rmsnorm, swiglu, no biases, grouped-query attention, tied or untied embeddings.
* GPT-2 style: learned positions, layernorm, gelu, biases, tied embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxlm.models.quant.spec import NO_QUANT, QuantSpec
from jaxlm.models.rope import NO_SCALING, RopeScaling
from jaxlm.run.errors import ConfigError

POSITION_EMBEDDINGS = ("rope", "learned")
NORMS = ("rmsnorm", "layernorm")
MLP_ACTIVATIONS = ("swiglu", "geglu", "gelu")
GATED_ACTIVATIONS = ("swiglu", "geglu")  # act(x @ w_gate) * (x @ w_in)
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_IMPLS = ("auto", "xla", "blocked", "chunked", "cudnn", "splash")
KV_CACHE_DTYPES = ("", "int8")  # "": the compute dtype
VOCAB_MULTIPLE = 128


def pad_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Rounds the vocabulary up to a multiple of `multiple` (TPU lanes / MXU tiles like 128)."""
    return -(-vocab_size // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts feed-forward blocks (see `jaxlm.models.moe` and docs/moe.md).

    Attributes:
      num_experts: experts per MoE block, each an MLP of width `ModelConfig.d_ff`.
      top_k: experts each token is sent to (1: Switch, 2: GShard / Mixtral).
      capacity_factor: an expert takes at most ceil(capacity_factor * k * L / E) tokens of each
        sequence of L tokens; the rest of its assignments are dropped (zero MLP output).
      dropless: capacity = L, so no assignment is ever dropped (costs E / k times the expert
        FLOPs of capacity_factor=1; for small E, evaluation, or checking drop effects).
      every: every this-many-th block is MoE (the last of each group), the others dense.
      aux_loss_weight: weight of the load-balancing loss added to the training loss.
      router_z_loss_weight: weight of the router z-loss (logsumexp of router logits)^2.
    """

    num_experts: int
    top_k: int = 2
    capacity_factor: float = 1.25
    dropless: bool = False
    every: int = 1
    aux_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.001

    def capacity(self, tokens_per_group: int) -> int:
        """Slots per expert for a group (one sequence) of `tokens_per_group` tokens."""
        if self.dropless:
            return tokens_per_group
        wanted = -(-self.capacity_factor * self.top_k * tokens_per_group // self.num_experts)
        return max(1, min(tokens_per_group, int(wanted)))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a decoder-only transformer.

    Attributes:
      vocab_size: tokenizer vocabulary size (ids the data can contain).
      d_model: residual stream width.
      num_layers: number of transformer blocks.
      num_heads: query heads.
      num_kv_heads: key/value heads (== num_heads: MHA, 1: MQA, otherwise GQA).
      head_dim: width of one head.
      d_ff: hidden width of the MLP (per branch for SwiGLU).
      max_seq_len: longest sequence the model is built for (size of learned position table).
      position_embedding: "rope" or "learned".
      norm: "rmsnorm" or "layernorm".
      mlp_activation: "swiglu", "geglu" or "gelu" (MLP_ACTIVATIONS).
      use_bias: biases on the dense layers (GPT-2 style).
      qkv_bias: biases on the query/key/value projections only (Qwen2 style); implied by use_bias.
      tie_embeddings: share the input embedding with the output projection.
      rope_theta: RoPE base frequency.
      rope_scaling: context extension of RoPE (linear, dynamic NTK, llama3, yarn; models/rope.py).
      sliding_window: W > 0: a query sees only the last W tokens (itself included) in the layers
        that use the window (Mistral; Gemma's local layers); 0 = full causal attention.
      global_every: with a sliding window, every this-many-th layer (the last of each group)
        attends globally (Gemma 2: 2, Gemma 3: 6); 0 = every layer uses the window, and the KV
        cache of decoding is then a ring buffer of W slots.
      rope_local_theta: RoPE base of the sliding-window layers (Gemma 3: 10000; plain RoPE,
        no scaling); 0 = the same RoPE as the global layers.
      norm_plus_one: RMSNorm multiplies by (1 + scale), scale initialised to 0 (Gemma).
      post_norms: a norm on the attention output and on the MLP output before each residual
        add (Gemma 2/3's post-attention / post-feedforward norms).
      qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Gemma 3).
      attn_scale_dim: scores are scaled by attn_scale_dim^-1/2 instead of head_dim^-1/2
        (Gemma's query_pre_attn_scalar); 0 = head_dim.
      embed_scale: the input embeddings are multiplied by sqrt(d_model) (Gemma).
      attn_logit_softcap: C > 0: attention scores (after scaling, before masking) become
        C * tanh(scores / C) (Gemma 2's attn_logit_softcapping); 0 = off.
      final_logit_softcap: C > 0: the vocab logits become C * tanh(logits / C) (Gemma 2's
        final_logit_softcapping), in the head and in the chunked losses; 0 = off.
      norm_eps: epsilon of the norms.
      param_dtype: dtype of the stored parameters ("float32").
      compute_dtype: dtype of matmuls and activations ("float32" on CPU, "bfloat16" on TPU/GPU).
      remat: rematerialisation policy of a block: "none", "full" or "save_dots".
      scan_layers: stack the blocks' parameters on a leading `layers` axis and run them with scan.
      attention: "xla" (reference einsum attention), "blocked" (causal query blocks that skip
        masked keys, hand-written backward pass; fastest on CPU), "chunked" (blockwise online
        softmax, O(L) memory, any backend), "cudnn" (cuDNN flash attention, NVIDIA GPU),
        "splash" (Pallas Splash attention, TPU) or "auto" (cudnn on GPU, splash on TPU,
        blocked on CPU). See docs/attention_and_fit_check.md.
      init_std: standard deviation of the normal initialiser of weight matrices.
      pipeline_stages: pipeline stages P the blocks are split into (the `pipeline` mesh axis);
        1 runs the blocks in one scan. P > 1 needs scan_layers and P dividing num_layers.
      pipeline_microbatches: microbatches M each batch is cut into for the pipeline schedule.
      pipeline_repeats: chunks V per stage (circular schedule when > 1): the layers form P*V
        chunks, chunk c on stage c mod P; P*V must divide num_layers.
      vocab_multiple: the embedding table is padded to a multiple of this.
      moe: mixture-of-experts settings; None = every block has the dense MLP.
      lora_rank: rank of LoRA adapters on the lora_targets weights (0: none; models/lora.py).
      lora_alpha: adapters are scaled by lora_alpha / lora_rank.
      lora_dropout: dropout rate on the adapters' inputs in training steps (a "dropout" rng).
      lora_targets: names of the adapted weights (attention wq/wk/wv/wo, mlp w_in/w_gate/w_out).
      reward_head: return a scalar per position, final hidden state . reward_head, instead of
        logits (reward models; the vocab head params still exist, so LM checkpoints load).
      kv_cache_dtype: what the KV cache of decoding stores: "" = k and v in the compute dtype,
        "int8" = int8 with a float32 scale per (row, slot, kv head) (models/kv_cache.py).
      quant: quantization of the matmul weights (the `quant` config section; jaxlm/models/quant/).
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int
    position_embedding: str = "rope"
    norm: str = "rmsnorm"
    mlp_activation: str = "swiglu"
    use_bias: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = NO_SCALING
    sliding_window: int = 0
    global_every: int = 0
    rope_local_theta: float = 0.0
    norm_plus_one: bool = False
    post_norms: bool = False
    qk_norm: bool = False
    attn_scale_dim: float = 0.0
    embed_scale: bool = False
    attn_logit_softcap: float = 0.0
    final_logit_softcap: float = 0.0
    norm_eps: float = 1e-5
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    attention: str = "auto"
    init_std: float = 0.02
    pipeline_stages: int = 1
    pipeline_microbatches: int = 1
    pipeline_repeats: int = 1
    vocab_multiple: int = VOCAB_MULTIPLE
    moe: MoeConfig | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    reward_head: bool = False
    kv_cache_dtype: str = ""
    quant: QuantSpec = NO_QUANT

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab(self.vocab_size, self.vocab_multiple)

    def is_moe_layer(self, index: int) -> bool:
        """Whether block `index` (0-based) has the MoE feed-forward: the last of every group."""
        return self.moe is not None and (index + 1) % self.moe.every == 0

    def layer_window(self, index: int) -> int:
        """The sliding window of block `index` (0-based); 0 = full causal attention."""
        if self.global_every and (index + 1) % self.global_every == 0:
            return 0
        return self.sliding_window

    @property
    def mixed_windows(self) -> bool:
        """Some layers use the sliding window and some attend globally."""
        return len({self.layer_window(i) for i in range(self.num_layers)}) > 1

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.compute_dtype)

    @property
    def weight_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)

    def check(self) -> None:
        """Raises ValueError naming the `model.*` key that is inconsistent."""

        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"config key model.{key}: {msg}")

        for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "d_ff", "max_seq_len"):
            if getattr(self, key) <= 0:
                fail(key, f"must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            fail("num_kv_heads", f"{self.num_kv_heads} must divide model.num_heads="
                 f"{self.num_heads} (grouped-query attention shares each kv head by a group)")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            fail("position_embedding", f"{self.position_embedding!r} not in {POSITION_EMBEDDINGS}")
        if self.position_embedding == "rope" and self.head_dim % 2:
            fail("head_dim", f"{self.head_dim} must be even for rope")
        self.rope_scaling.check(fail)
        if self.attn_scale_dim < 0 or self.rope_local_theta < 0:
            fail("attn_scale_dim", "attn_scale_dim and rope_local_theta must be >= 0")
        for key in ("attn_logit_softcap", "final_logit_softcap"):
            if not getattr(self, key) >= 0:  # also refuses NaN
                fail(key, f"must be >= 0 (0 = no soft-capping), got {getattr(self, key)}")
        if self.norm_plus_one and self.norm != "rmsnorm":
            fail("norm_plus_one", "the (1 + scale) form is for model.norm='rmsnorm'")
        if self.moe is not None and self.mlp_activation == "geglu":
            fail("mlp_activation", "mixture-of-experts blocks are SwiGLU or GELU, not GeGLU")
        if self.sliding_window < 0 or self.global_every < 0:
            fail("sliding_window", "sliding_window and global_every must be >= 0")
        if self.mixed_windows and (self.pipeline_stages > 1 or (
                self.moe is not None and self.moe.every > 1)):
            fail("global_every", "alternating local and global layers cannot run in the "
                 "pipeline schedule or with model.moe.every > 1")
        if self.norm not in NORMS:
            fail("norm", f"{self.norm!r} not in {NORMS}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            fail("mlp_activation", f"{self.mlp_activation!r} not in {MLP_ACTIVATIONS}")
        if self.remat not in REMAT_POLICIES:
            fail("remat", f"{self.remat!r} not in {REMAT_POLICIES}")
        if self.lora_rank < 0:
            fail("lora.rank", f"must be >= 0 (0 = no adapters), got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            fail("lora.dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.lora_dropout and self.pipeline_stages > 1:
            fail("lora.dropout", "LoRA dropout is not supported with pipeline stages "
                 "(mesh.pipeline > 1); set model.lora.dropout=0")
        if self.attention not in ATTENTION_IMPLS:
            fail("attention", f"{self.attention!r} not in {ATTENTION_IMPLS}")
        if self.attention == "cudnn" and self.attn_logit_softcap:
            fail("attention", "cuDNN attention cannot soft-cap the scores "
                 "(model.attn_logit_softcap); use 'auto', 'chunked' or 'xla'")
        if self.pipeline_stages < 1 or self.pipeline_microbatches < 1:
            fail("pipeline_stages", "pipeline stages and microbatches must be >= 1")
        if self.pipeline_stages > 1 and not self.scan_layers:
            fail("scan_layers", f"pipeline_stages={self.pipeline_stages} needs the stacked "
                 "layers of scan_layers=True")
        if self.num_layers % self.pipeline_stages:
            fail("num_layers", f"{self.num_layers} layers cannot be split evenly into "
                 f"{self.pipeline_stages} pipeline stages")
        if self.pipeline_repeats < 1 or self.num_layers % (self.pipeline_stages
                                                            * self.pipeline_repeats):
            fail("pipeline_repeats", f"{self.num_layers} layers cannot be split evenly into "
                 f"{self.pipeline_stages} stages x {self.pipeline_repeats} repeats")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            fail("kv_cache_dtype", f"{self.kv_cache_dtype!r} not in {KV_CACHE_DTYPES} ('' = the "
                 "compute dtype)")
        for key in ("param_dtype", "compute_dtype"):
            try:
                jnp.dtype(getattr(self, key))
            except TypeError:
                fail(key, f"{getattr(self, key)!r} is not a dtype name")
        self._check_quant()
        if self.moe is not None:
            self._check_moe(fail)
            mlp_targets = {"w_in", "w_gate", "w_out"} & set(self.lora_targets)
            if self.lora_rank and mlp_targets:
                fail("lora.mlp", f"LoRA adapters on the MLP ({sorted(mlp_targets)}) would "
                     f"leave the {self.moe.num_experts} experts of model.moe unadapted: "
                     "experts take no adapters; set model.lora.mlp=False (attention only)")
            if self.pipeline_stages > 1:
                fail("moe.num_experts", "mixture-of-experts blocks cannot run in the pipeline "
                     "schedule yet: use mesh.pipeline=1 with model.moe")

    def _check_quant(self) -> None:
        """The `quant.*` keys, and that a tile size divides every quantized input axis."""

        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"config key quant.{key}: {msg}")

        self.quant.check(fail)
        tile = self.quant.tile_size
        if tile and self.quant.mode != "none":
            sizes = {"model.d_model": self.d_model, "model.head_dim": self.head_dim,
                     "model.d_ff": self.d_ff}
            for key, size in sizes.items():
                if size % tile:
                    fail("tile_size", f"{tile} does not divide {key}={size} (tiles run along "
                         "each weight's last input axis)")

    def _check_moe(self, fail: Any) -> None:
        moe = self.moe
        if moe.num_experts < 1:
            fail("moe.num_experts", f"must be >= 1, got {moe.num_experts}")
        if moe.top_k not in (1, 2) or moe.top_k > moe.num_experts:
            fail("moe.top_k", f"must be 1 or 2 and at most model.moe.num_experts="
                 f"{moe.num_experts}, got {moe.top_k}")
        if moe.capacity_factor <= 0:
            fail("moe.capacity_factor", f"must be positive, got {moe.capacity_factor}")
        if moe.every < 1 or self.num_layers % moe.every:
            fail("moe.every", f"{moe.every} must be >= 1 and divide model.num_layers="
                 f"{self.num_layers}")
        for key in ("aux_loss_weight", "router_z_loss_weight"):
            if getattr(moe, key) < 0:
                fail(f"moe.{key}", f"must be >= 0, got {getattr(moe, key)}")
