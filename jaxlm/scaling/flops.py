"""Parameter and FLOP counts of a `ModelConfig`, computed from the config alone (no init).

These numbers feed the logged parameter count, tokens/s -> MFU, and later the compute-optimal
(Chinchilla) sizing of runs. They describe the model exactly as `jaxlm.models.Transformer` builds
it: vocabulary padded to `cfg.padded_vocab_size`, grouped-query k/v with `num_kv_heads`, SwiGLU
with three matrices, biases and LayerNorm offsets only where configured.

Parameter-count convention (`count_params`):
  * `total` is every parameter the model holds (equal to the sum of the initialised leaf sizes).
    This is the N of Chinchilla (Hoffmann et al. 2022), which counts embeddings too.
  * `embedding` is the input side only: the (padded) token table plus the learned position table.
  * `non_embedding` = `total` - `embedding`: Kaplan et al. (2020)'s N. An *untied* output head is
    kept in it, because it is a real [D, V] matmul every token pays for, like any other weight;
    a tied head has no parameters of its own, so it appears in neither `head` nor `non_embedding`.
  * `chinchilla` is the count Hoffmann et al. (2022) report for their models (Table A9): per
    layer the four attention projections, one more d_model x (heads x head_dim) projection for
    the relative position encoding (Gopher/Chinchilla use Transformer-XL style relative
    positions) and the MLP's matrices, plus one vocabulary matrix V x d_model; no norms, no
    biases, no second vocabulary matrix. N = layers (5 d hk + 2 d ffw) + V d reproduces all 50
    rows of Table A9 within 0.8% (the 1018M row: 1017.5M). It is a convention on the shapes,
    applied whatever jaxlm builds (RoPE has no relative-position weights; an untied head is a
    second vocabulary matrix), so that budgets of 20 tokens per parameter mean the paper's.
  * `kaplan` is Kaplan et al. (2020)'s N = 2 d_model n_layer (2 d_attn + d_ff): the attention
    and MLP weight matrices only (no embeddings, head, norms or biases).
  `PARAM_CONVENTIONS` names the conventions a config may choose (`train.param_convention`):
  "chinchilla", "total" (as built), "non_embedding" (as built) and "kaplan".

FLOP convention (`flops_per_token`), one multiply-add = 2 FLOPs, matmuls only, in the style of
Chinchilla's Appendix F:
  * the embedding lookup is a gather and costs 0 here (Chinchilla charges it as a one-hot matmul,
    2 * V * D; no hardware does that work, so it is left out of "model FLOPs");
  * attention scores QK^T and the weighted sum over values are charged for the full L x L matrix,
    2 * 2 * L * H * K per token and layer with L = seq_len (PaLM's 6N + 12 * layers * H * K * L).
    That is what the XLA attention in `jaxlm.models.attention` computes before masking; a causal
    kernel that skips the masked half does about half of this work;
  * softmax, norms, activations, biases, RoPE and residual adds are not counted (they are a few
    percent for realistic shapes);
  * the output head is charged over the padded vocabulary, tied or not;
  * training = 3 x forward (backward = 2 x forward); recomputation from `remat` is not counted, as
    is usual for MFU (it would be "hardware FLOPs").

Training work by what trains (`train_flops_per_token`, what the stages' MFU counts): a weight
matmul's backward is an input gradient (= its forward) plus, only when the weight trains, a
weight gradient (= its forward again); attention's two matmuls have activations on both sides,
so their backward is always 2 x forward. With every weight training this is the 3 x forward
above. With LoRA the base weights (and the vocabulary head) are frozen, so they cost 2 x forward,
and the adapters' own 2 r (in + out) per token and weight cost 3 x. A reward model has no
vocabulary head (a d_model -> 1 score instead), and a frozen reference model evaluated in the
step adds one forward pass.

Mixture of experts (`cfg.moe`): `total` holds every expert; `active` / `active_non_embedding`
count only the top_k experts a token uses (plus the router), and the FLOPs charge a token its
top_k experts and the router matmul. Slots left empty by the capacity factor (compute spent on
padding, up to capacity_factor - 1 extra) are hardware FLOPs and are not counted.
"""

from __future__ import annotations

from jaxlm.models.config import GATED_ACTIVATIONS, ModelConfig
from jaxlm.run.errors import ConfigError


def _attention_weights_per_layer(cfg: ModelConfig) -> int:
    d, h, n, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return d * h * k + 2 * d * n * k + h * k * d  # wq, wk, wv, wo


def _attention_params_per_layer(cfg: ModelConfig) -> int:
    d, h, n, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    weights = _attention_weights_per_layer(cfg)
    biases = (h * k + 2 * n * k + d) if cfg.use_bias else 0  # bq, bk, bv, bo
    if cfg.qkv_bias and not cfg.use_bias:
        biases = h * k + 2 * n * k  # bq, bk, bv
    return weights + biases


def _mlp_params_per_layer(cfg: ModelConfig) -> int:
    d, f = cfg.d_model, cfg.d_ff
    matrices = 3 if cfg.mlp_activation in GATED_ACTIVATIONS else 2  # w_in, w_out (+ w_gate)
    biases = (f + d) if cfg.use_bias else 0  # b_in, b_out
    return matrices * d * f + biases


def _moe_layers(cfg: ModelConfig) -> int:
    return cfg.num_layers // cfg.moe.every if cfg.moe is not None else 0


def _moe_mlp_params(cfg: ModelConfig, experts: int) -> int:
    """MLP parameters of all layers when each MoE layer holds `experts` experts (+ router)."""
    dense, moe_layers = _mlp_params_per_layer(cfg), _moe_layers(cfg)
    router = cfg.d_model * cfg.moe.num_experts if moe_layers else 0
    return (cfg.num_layers - moe_layers) * dense + moe_layers * (experts * dense + router)


def _mlp_weights(cfg: ModelConfig) -> int:
    """MLP weight matrices of all layers, every expert and the router included, no biases."""
    dense = (3 if cfg.mlp_activation in GATED_ACTIVATIONS else 2) * cfg.d_model * cfg.d_ff
    moe_layers = _moe_layers(cfg)
    router = cfg.d_model * cfg.moe.num_experts if moe_layers else 0
    experts = cfg.moe.num_experts if moe_layers else 0
    return (cfg.num_layers - moe_layers) * dense + moe_layers * (experts * dense + router)


def _norm_params(cfg: ModelConfig) -> int:
    """Scale (+ bias for LayerNorm) of 2 norms per block (4 with Gemma's post-attention and
    post-MLP norms) and the final norm, plus Gemma 3's query and key norms (one head_dim scale
    each per block)."""
    per_norm = cfg.d_model * (2 if cfg.norm == "layernorm" else 1)
    per_block = (4 if cfg.post_norms else 2) * per_norm + (2 * cfg.head_dim if cfg.qk_norm else 0)
    return cfg.num_layers * per_block + per_norm


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by component; see the module docstring for the convention.

    Keys: `total`, `embedding` (= `token_embedding` + `position_embedding`), `non_embedding`,
    `attention`, `mlp`, `norms` (all layers together), `head` (0 when tied), `reward_head` (a
    reward model's or a PPO value head's score vector, else 0), and
    `active` / `active_non_embedding` (what one token uses: equal to `total` / `non_embedding`
    unless the model is a mixture of experts), and the published conventions `chinchilla`
    (Hoffmann et al.'s Table A9 count) and `kaplan` (Kaplan et al.'s non-embedding N).
    """
    vocab, d = cfg.padded_vocab_size, cfg.d_model
    token_embedding = vocab * d
    position_embedding = cfg.max_seq_len * d if cfg.position_embedding == "learned" else 0
    counts = {
        "token_embedding": token_embedding,
        "position_embedding": position_embedding,
        "embedding": token_embedding + position_embedding,
        "attention": cfg.num_layers * _attention_params_per_layer(cfg),
        "mlp": _moe_mlp_params(cfg, cfg.moe.num_experts if cfg.moe else 1),
        "norms": _norm_params(cfg),
        "head": 0 if cfg.tie_embeddings else d * vocab,
        # A reward model's (or PPO value head's) d_model -> 1 score vector.
        "reward_head": d if cfg.reward_head else 0,
    }
    counts["non_embedding"] = (counts["attention"] + counts["mlp"] + counts["norms"]
                               + counts["head"] + counts["reward_head"])
    counts["total"] = counts["embedding"] + counts["non_embedding"]
    inactive = counts["mlp"] - _moe_mlp_params(cfg, cfg.moe.top_k if cfg.moe else 1)
    counts["active_non_embedding"] = counts["non_embedding"] - inactive
    counts["active"] = counts["total"] - inactive
    kaplan = cfg.num_layers * _attention_weights_per_layer(cfg) + _mlp_weights(cfg)
    counts["kaplan"] = kaplan
    relative_position = cfg.num_layers * d * cfg.num_heads * cfg.head_dim
    counts["chinchilla"] = kaplan + relative_position + cfg.vocab_size * d
    return counts


PARAM_CONVENTIONS = ("chinchilla", "total", "non_embedding", "kaplan")


def param_count(cfg: ModelConfig, convention: str = "chinchilla") -> int:
    """N of the model under a named convention (`PARAM_CONVENTIONS`; see the module doc): what
    tokens-per-parameter budgets and sweep results divide by."""
    if convention not in PARAM_CONVENTIONS:
        raise ConfigError(f"config key train.param_convention: {convention!r} is not one of "
                         f"{PARAM_CONVENTIONS}")
    return count_params(cfg)[convention]


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Matmul FLOPs per token of a sequence of `seq_len` tokens; see the module docstring.

    Per-layer terms are summed over all layers. Keys: `embedding` (0), `qkv_projections`,
    `attention_logits`, `attention_values`, `output_projection`, `mlp`, `head`, `forward`,
    `train` (3 x forward), and for comparison `approx_6n` = 6 * active_non_embedding params and
    `approx_6n_total` = 6 * active params (Kaplan's and Chinchilla's C = 6N per token; active =
    all params for a dense model).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if cfg.position_embedding == "learned" and seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds model.max_seq_len={cfg.max_seq_len}, the "
                         "size of the learned position table")
    d, h, n, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
    layers, moe_layers = cfg.num_layers, _moe_layers(cfg)
    mlp_matrices = 3 if cfg.mlp_activation in GATED_ACTIVATIONS else 2
    per_token_mlp = 2 * mlp_matrices * d * f
    mlp = (layers - moe_layers) * per_token_mlp
    if moe_layers:
        mlp += moe_layers * (cfg.moe.top_k * per_token_mlp + 2 * d * cfg.moe.num_experts)
    flops = {
        "embedding": 0.0,
        "qkv_projections": float(layers * 2 * d * (h + 2 * n) * k),
        "attention_logits": float(layers * 2 * seq_len * h * k),
        "attention_values": float(layers * 2 * seq_len * h * k),
        "output_projection": float(layers * 2 * h * k * d),
        "mlp": float(mlp),
        "head": float(2 * d * cfg.padded_vocab_size),
    }
    flops["forward"] = sum(flops.values())
    flops["train"] = 3.0 * flops["forward"]
    params = count_params(cfg)
    flops["approx_6n"] = 6.0 * params["active_non_embedding"]
    flops["approx_6n_total"] = 6.0 * params["active"]
    return flops


def flops_per_step(cfg: ModelConfig, seq_len: int, global_batch_size: int) -> float:
    """Training FLOPs of one optimizer step: `train` FLOPs per token x tokens in the batch."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    return flops_per_token(cfg, seq_len)["train"] * seq_len * global_batch_size


def _lora_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of the LoRA adapters, 2 r (in + out) per adapted weight per layer
    (MLP targets only in dense layers: the experts of an MoE block have no adapters)."""
    if not cfg.lora_rank:
        return 0.0
    d, h, n, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
    sizes = {"wq": d + h * k, "wk": d + n * k, "wv": d + n * k, "wo": h * k + d,
             "w_in": d + f, "w_gate": d + f if cfg.mlp_activation in GATED_ACTIVATIONS else 0,
             "w_out": f + d}
    dense_layers = cfg.num_layers - _moe_layers(cfg)
    total = 0.0
    for name in cfg.lora_targets:
        layers = cfg.num_layers if name in ("wq", "wk", "wv", "wo") else dense_layers
        total += layers * 2 * cfg.lora_rank * sizes[name]
    return total


def _forward_parts(cfg: ModelConfig, seq_len: int, vocab_head: bool
                   ) -> tuple[float, float, float]:
    """Forward FLOPs per token of (the weight matmuls, attention, LoRA adapters)."""
    f = flops_per_token(cfg, seq_len)
    head = f["head"] if vocab_head else 2.0 * cfg.d_model
    weights = f["qkv_projections"] + f["output_projection"] + f["mlp"] + head
    return weights, f["attention_logits"] + f["attention_values"], _lora_flops_per_token(cfg)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, *, vocab_head: bool = True
                            ) -> float:
    """FLOPs of one forward pass per token at `seq_len` context (a frozen reference, a
    rollout's prefill and decode tokens, a reward model's scoring with vocab_head=False)."""
    return sum(_forward_parts(cfg, seq_len, vocab_head))


def train_flops_per_token(cfg: ModelConfig, seq_len: int, *, frozen_base: bool = False,
                          vocab_head: bool = True, reference_forwards: int = 0) -> float:
    """FLOPs per trained token of one training step, counting what is actually computed.

    frozen_base: the base weights get no weight gradient (LoRA: only the adapters, and a reward
      head, train). vocab_head: False for a reward model (a d_model -> 1 score, not the [D, V]
      head). reference_forwards: forward passes of a frozen copy of the model per token (DPO's
      reference evaluated inside the step). With the defaults this is `flops_per_token`'s
      `train` (3 x forward).
    """
    weights, attention, adapters = _forward_parts(cfg, seq_len, vocab_head)
    forward = weights + attention + adapters
    backward = 2.0 * attention + 2.0 * adapters + (1.0 if frozen_base else 2.0) * weights
    return forward + backward + reference_forwards * forward
