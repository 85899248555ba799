"""Run configuration: the defaults of every section, validation, and derived numbers.

A config file is `get_config(arg=None)` that starts from `base_config()` and sets what differs.
`validate` runs before anything is compiled and raises one `ValueError` naming the key to fix.
Only this module turns user-facing sizes into derived ones (default head_dim, kv heads, d_ff,
per-replica batch, microbatch size).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
from typing import Any

import ml_collections
from absl import logging

from jaxlm.data.chat import default_chat_config
from jaxlm.data.config import check_data_config, default_data_config
from jaxlm.evaluation.settings import check_eval_config, default_eval_config
from jaxlm.models.config import ModelConfig, MoeConfig
from jaxlm.models.lora import ATTENTION_TARGETS, MLP_TARGETS
from jaxlm.models.pipeline import bubble_fraction
from jaxlm.models.quant.spec import NO_QUANT, QuantSpec
from jaxlm.models.rope import RopeScaling
from jaxlm.parallel.distributed import check_distributed_config, default_distributed_config
from jaxlm.parallel.sharding import MESH_AXES, resolve_mesh_shape
from jaxlm.run import errors
from jaxlm.run.errors import ConfigError
from jaxlm.scaling import flops as scaling
from jaxlm.stages import STAGE_MODULES, all_sections, get_stage

STAGES = tuple(STAGE_MODULES)


def base_config() -> ml_collections.ConfigDict:
    """Every key a run may set, with its default. Config files override a subset."""
    c = ml_collections.ConfigDict()
    # Which stage trains: "pretrain", "sft", "dpo" or "reward" (docs/post_training.md), "grpo",
    # "ppo" or "rejection" (docs/rl.md), "distill" (docs/distillation.md); the registry is
    # jaxlm/stages/__init__.py.
    c.stage = "pretrain"
    # Seed of parameter init (data order has its own seed, data.seed).
    c.seed = 0

    c.model = m = ml_collections.ConfigDict()
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
    # "swiglu" (Llama) or "gelu" (GPT-2).
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

    c.data = default_data_config()
    # Chat template of the sft, dpo and reward stages (jaxlm/data/chat.py).
    c.chat = default_chat_config()
    # The stages' sections (sft, dpo, reward, rl, ppo, ...), each from the module that owns it.
    for section in all_sections():
        c[section.name] = section.defaults()

    c.optim = o = ml_collections.ConfigDict()
    # Peak learning rate, reached at the end of warmup.
    o.learning_rate = 3e-4
    # Linear warmup from 0 to learning_rate over this many steps.
    o.warmup_steps = 100
    # Cosine decay ends at learning_rate * min_lr_ratio on the last step.
    o.min_lr_ratio = 0.1
    # AdamW moments and epsilon.
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    # Decoupled weight decay; never applied to norms and biases.
    o.weight_decay = 0.1
    # Whether weight decay applies to the embedding table (and position table).
    o.decay_embeddings = False
    # Global-norm gradient clipping; 0 disables.
    o.clip_norm = 1.0
    # Coefficient of the z-loss (log Z)^2 that keeps the softmax normaliser near 1; 0 disables.
    o.z_loss = 0.0
    # Gradient accumulation: each step's batch is split into this many sequential microbatches.
    o.grad_accum_steps = 1

    # Weight quantization through qwix (docs/quantization.md).
    c.quant = qu = ml_collections.ConfigDict()
    # "none"; "qat": train with fake-quantized matmul weights (straight-through gradients);
    # "ptq": the matmul weights are held quantized: with model.lora.rank > 0 the frozen base of
    # QLoRA, otherwise what `jaxlm.tools.quantize` / --quantize write for inference.
    qu.mode = "none"
    # Weight type: "int8", "int4" or "nf4" (4-bit NormalFloat).
    qu.weight = "int8"
    # "int8": activations quantized per token at run time, int8 x int8 matmuls (ptq, int8).
    qu.activation = "none"
    # 0 = one scale per output channel; T = one per T inputs of each output channel; -1 = the
    # weight type's default: 64 for nf4 (QLoRA's blocks of 64), 0 for int8 and int4.
    qu.tile_size = -1

    c.mesh = me = ml_collections.ConfigDict()
    # Device-mesh axis sizes; one of them may be -1 ("the rest of the devices").
    me.data = -1
    me.fsdp = 1
    me.tensor = 1
    # Pipeline stages: the blocks are split into this many stages of num_layers / pipeline
    # layers each (GPipe or circular schedule, see docs/pipeline.md). Never -1.
    me.pipeline = 1
    # Expert parallelism: MoE experts are split over this axis (it also splits the batch).
    me.expert = 1

    c.train = t = ml_collections.ConfigDict()
    # Sequences per optimizer step, over all devices and processes.
    t.global_batch_size = 16
    # Optimizer steps of the run; 0 = from the token budget below (see docs/scaling.md).
    t.steps = 1000
    # Token budget of the run (0: unset); needs train.steps = 0. Steps = ceil(tokens / tokens
    # per step), resolved in one place: `resolve_steps`. The LR schedule follows those steps.
    t.tokens = 0
    # Token budget as tokens per model parameter (0: unset, which is 20, Chinchilla's
    # compute-optimal ratio, when train.steps and train.tokens are 0 too); needs train.steps = 0.
    t.tokens_per_param = 0.0
    # What "parameter" means in tokens_per_param and in sweep results (docs/scaling.md):
    # "chinchilla" (Hoffmann et al.'s Table A9 count), "total" or "non_embedding" (as built),
    # "kaplan" (Kaplan et al.'s attention + MLP matrices).
    t.param_convention = "chinchilla"
    # Evaluate on held-out data every this many steps (0: only at the last step); never when
    # train.eval_steps is 0.
    t.eval_every = 200
    # Batches per evaluation.
    t.eval_steps = 4
    # A step whose loss or gradient norm is NaN/Inf is skipped (params unchanged); the run stops
    # with an error after this many such steps in a row.
    t.max_nonfinite = 10
    # Pipeline microbatches (mesh.pipeline > 1 only): each batch (each grad_accum_steps chunk)
    # is cut into this many microbatches that flow through the stages together; the idle
    # "bubble" fraction is (pipeline - 1) / (pipeline_microbatches + pipeline - 1).
    t.pipeline_microbatches = 1
    # Circular pipeline schedule (mesh.pipeline > 1 only): each stage holds this many chunks V of
    # num_layers / (pipeline * V) layers (chunk c on stage c mod pipeline) and the microbatches
    # go round the stages V times, so the bubble shrinks to (P - 1) / (V * M + P - 1) for
    # M = pipeline_microbatches >= P (required). 1 = GPipe. Must divide num_layers / pipeline.
    # Checkpoints keep the stacked layout; the step transposes the block params (and their
    # gradients) across `pipeline` instead, about one parameter-sized send per device per step.
    t.pipeline_repeats = 1

    # How this process joins a multi-host job (see docs/multihost.md); auto-detected on Cloud TPU
    # and SLURM, a no-op on one machine.
    c.distributed = default_distributed_config()

    c.checkpoint = ck = ml_collections.ConfigDict()
    # Save every this many steps (0: only at the end / on SIGTERM). A run started on a workdir
    # that holds checkpoints resumes from the newest complete one.
    ck.every_steps = 500
    # Keep the newest this many checkpoints...
    ck.keep_last = 3
    # ...plus every checkpoint whose step is a multiple of this (0: none).
    ck.keep_every = 0
    # Write in the background while training continues.
    ck.async_save = True

    c.init_from = fi = ml_collections.ConfigDict()
    # Start from the params of another run's checkpoint directory (<workdir>/checkpoints of an
    # earlier stage); the optimizer starts fresh. "" = random init. Ignored when resuming.
    fi.path = ""
    # Step of that checkpoint; -1 = its newest.
    fi.step = -1
    # A config file ("configs/x.py:arg=...") whose run makes the starting checkpoint: with
    # init_from.path empty, it trains first in <workdir>/init (resumed if cut short) and its
    # checkpoints start this run (jaxlm/run/start_run.py). "" = none.
    fi.config = ""

    c.log = lg = ml_collections.ConfigDict()
    # Write metrics.jsonl / TensorBoard / the progress line every this many steps.
    lg.every_steps = 10
    # Print a greedy continuation of log.sample_prompt every this many steps (0: never).
    lg.sample_every = 200
    # The fixed prompt of logged samples. No trailing space: BPE pieces carry their leading
    # space (" foo"), so "def " ends in a lone-space piece the model has rarely seen.
    lg.sample_prompt = "def"
    # Tokens generated per sample.
    lg.sample_tokens = 32
    # Peak FLOP/s per device for MFU; 0 = from the device table, measured on CPU.
    lg.peak_flops = 0.0
    # Also write TensorBoard event files under <workdir>/tensorboard.
    lg.tensorboard = True

    # Evals during training (jaxlm/evaluation/settings.py): eval.tasks, eval.every_steps, ...
    c.eval = default_eval_config()
    return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a config file's argument `"k1=v1,k2=v2"` over typed defaults.

    `--config=configs/chinchilla.py:size=1018,smoke=True` reaches get_config as that string.
    Values take the type of their default; an unknown name is an error naming it.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config argument {item!r}: expected one of "
                             f"{', '.join(f'{k}=...' for k in defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}: {value!r} is not a boolean")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError as e:
                raise ValueError(f"config argument {key}: {value!r} is not a {kind.__name__}"
                                 ) from e
    return out


def load_config_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path`.

    How one config file builds on another: `configs/sft_tiny.py` starts from
    `load_config_file(Path(__file__).with_name("tiny.py"))` and sets what differs.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"config file {path!r} does not exist; check --config",
                                      path=path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# Config keys that were renamed: old dotted name -> new one. Setting an old name (in a config
# file or as a --config.* override) is an error naming the new key, never silently ignored.
RENAMED_KEYS: dict[str, str] = {
    "train.num_microbatches": "train.pipeline_microbatches",
    # One name per idea: the KL coefficient and the reward model are the RL stages' shared keys,
    # GAE's discount and lambda PPO's own.
    "ppo.kl_coef": "rl.kl_coef",
    "ppo.reward_model": "rl.reward_model",
    "ppo.reward_model_step": "rl.reward_model_step",
    "rl.gamma": "ppo.gamma",
    "rl.lam": "ppo.lam",
}


def check_renamed_key(name: str) -> None:
    """Raises ValueError naming the new key when the dotted `name` is a renamed config key."""
    if name in RENAMED_KEYS:
        _fail(name, f"renamed to {RENAMED_KEYS[name]}")


def check_override_key(name: str) -> None:
    """Raises naming the key when a `--config.<name>` override is renamed or unknown (with the
    closest known key), before ml_collections would fail with a bare AttributeError."""
    check_renamed_key(name)
    node: Any = base_config()
    parts = name.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict):
            return  # a value that is itself a dict/tuple: ml_collections checks the rest
        if part not in node:
            prefix = ".".join(parts[:i] + [""])
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            _fail(name, f"unknown key{hint}")
        node = node[part]


def _unknown_keys(config: Any, schema: Any, prefix: str = "") -> None:
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            check_renamed_key(name)
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise errors.config_error(name, f"unknown key{hint}")
        value, expected = config[key], schema[key]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config key {name}: must be a section, got {value!r}")
            _unknown_keys(value, expected, prefix=f"{name}.")


def _fail(key: str, msg: str) -> None:
    raise errors.config_error(f"{key}", msg)


# `model.*` keys that are not a ModelConfig field of the same name and meaning: 0 = "derive it"
# sizes, and the sections `moe`, `lora`, `rope_scaling` (every other model key is copied as is).
DERIVED_MODEL_KEYS = ("vocab_size", "num_kv_heads", "head_dim", "d_ff", "max_seq_len", "moe",
                      "lora", "rope_scaling")


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
    """The typed model config, with 0-valued sizes resolved. Raises naming `model.*` keys."""
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


# quant.tile_size = -1: nf4 in blocks of 64 inputs as QLoRA (Dettmers et al. 2023; relative
# RMS error 9.2% on Gaussian weights, 11.0% with one scale per output channel).
DEFAULT_TILE_SIZE = {"nf4": 64}


def quant_spec(config: ml_collections.ConfigDict) -> QuantSpec:
    """The `quant` section as a QuantSpec (a saved config without the section: no quant)."""
    q = config.get("quant")
    if q is None:
        return NO_QUANT
    tile = DEFAULT_TILE_SIZE.get(q.weight, 0) if q.tile_size == -1 else q.tile_size
    return QuantSpec(mode=q.mode, weight=q.weight, activation=q.activation, tile_size=tile)


def _check_quant_training(config: ml_collections.ConfigDict) -> None:
    """A run that trains holds quantized weights only as QLoRA's frozen base."""
    q = config.quant
    if q.mode == "ptq" and not config.model.lora.rank:
        _fail("quant.mode", "'ptq' weights cannot be trained: quantize a trained checkpoint "
              "with `python -m jaxlm.tools.quantize` (or --quantize), use 'qat' to train with "
              "fake quantization, or set model.lora.rank > 0 for QLoRA's quantized frozen base")
    if q.mode == "ptq" and q.activation != "none":
        _fail("quant.activation", "activation quantization is for inference only; QLoRA "
              "trains with quant.activation='none'")


def _check_pipeline(config: ml_collections.ConfigDict) -> None:
    stages, m = config.mesh.pipeline, config.train.pipeline_microbatches
    layers = config.model.num_layers
    if stages == -1:
        _fail("mesh.pipeline", "-1 is not supported here; give the number of pipeline stages")
    if m < 1:
        _fail("train.pipeline_microbatches", f"must be >= 1, got {m}")
    if stages == 1 and m > 1:
        _fail("train.pipeline_microbatches", f"{m} pipeline microbatches need mesh.pipeline > "
              "1; for sequential microbatches (gradient accumulation) use optim.grad_accum_steps")
    if stages > 1 and not config.model.scan_layers:
        _fail("model.scan_layers", f"mesh.pipeline={stages} needs scan_layers=True (the "
              "stages are slices of the stacked layers)")
    if stages > 1 and layers % stages:
        _fail("mesh.pipeline", f"{stages} pipeline stages do not divide model.num_layers="
              f"{layers}: every stage holds num_layers / mesh.pipeline layers")
    repeats = config.train.pipeline_repeats
    if repeats < 1:
        _fail("train.pipeline_repeats", f"must be >= 1, got {repeats}")
    if repeats > 1 and stages == 1:
        _fail("train.pipeline_repeats", f"{repeats} circular repeats need mesh.pipeline > 1")
    if repeats > 1 and (layers // stages) % repeats:
        _fail("train.pipeline_repeats", f"{repeats} does not divide the {layers // stages} "
              f"layers of a stage (model.num_layers={layers} / mesh.pipeline={stages})")
    if repeats > 1 and m < stages:
        _fail("train.pipeline_repeats", "the circular schedule needs "
              f"train.pipeline_microbatches >= mesh.pipeline, got {m} < {stages} (with fewer "
              "microbatches than stages it idles like GPipe); raise train.pipeline_microbatches "
              "or set pipeline_repeats=1")


def pipeline_summary(config: ml_collections.ConfigDict) -> str | None:
    """The startup log line of a pipelined run (None without pipelining): stages, microbatch
    sizes, schedule and its bubble fraction."""
    stages, m = config.mesh.pipeline, config.train.pipeline_microbatches
    repeats = config.train.pipeline_repeats
    if stages == 1:
        return None
    rows = config.train.global_batch_size // config.optim.grad_accum_steps // m
    bubble = bubble_fraction(stages, m, repeats)
    layers = config.model.num_layers // stages
    if repeats == 1:
        schedule = f"GPipe schedule: bubble fraction (P-1)/(M+P-1) = {bubble:.3f}"
    else:
        schedule = (f"circular schedule, {repeats} chunks of {layers // repeats} layers per "
                    f"stage: bubble fraction (P-1)/(V*M+P-1) = {bubble:.3f}")
    return (f"pipeline: {stages} stages x {layers} layers, {m} microbatches of {rows} "
            f"sequences (global), {schedule}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Device-independent checks of a whole run config; raises ValueError naming the key."""
    _unknown_keys(config, base_config())
    _check_finite_floats(config)
    stage = get_stage(config.stage)  # raises naming the key for an unknown stage
    check_data_config(config.data)
    for section in stage.sections:
        if section.check is not None:
            section.check(config)
    check_distributed_config(config.distributed)
    check_eval_config(config.eval)
    _check_pipeline(config)
    model_config(config, vocab_size=config.model.vocab_size or 1)
    _check_quant_training(config)
    if config.model.max_seq_len and config.model.max_seq_len < config.data.seq_len:
        _fail("model.max_seq_len", f"{config.model.max_seq_len} is shorter than "
              f"data.seq_len={config.data.seq_len}")
    o, t = config.optim, config.train
    _check_budget(t)
    if o.learning_rate <= 0:
        _fail("optim.learning_rate", f"must be positive, got {o.learning_rate}")
    if not 0 <= o.min_lr_ratio <= 1:
        _fail("optim.min_lr_ratio", f"must lie in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps < 0:
        _fail("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if o.grad_accum_steps < 1:
        _fail("optim.grad_accum_steps", f"must be >= 1, got {o.grad_accum_steps}")
    if t.global_batch_size < 1:
        _fail("train.global_batch_size", f"must be >= 1, got {t.global_batch_size}")
    if t.eval_every < 0 or t.eval_steps < 0:
        _fail("train.eval_every" if t.eval_every < 0 else "train.eval_steps", "must be >= 0")
    ck = config.checkpoint
    for key in ("every_steps", "keep_every"):
        if ck[key] < 0:
            _fail(f"checkpoint.{key}", f"must be >= 0, got {ck[key]}")
    if ck.keep_last < 1:
        _fail("checkpoint.keep_last", f"must be >= 1, got {ck.keep_last}")
    if t.max_nonfinite < 1:
        _fail("train.max_nonfinite", f"must be >= 1, got {t.max_nonfinite}")
    if config.log.every_steps < 1:
        _fail("log.every_steps", f"must be >= 1, got {config.log.every_steps}")
    for axis in MESH_AXES:
        size = config.mesh[axis]
        if size == 0 or size < -1:
            _fail(f"mesh.{axis}", f"size must be positive or -1, got {size}")


def _check_finite_floats(config: Any, prefix: str = "") -> None:
    """Every float key is finite: NaN passes every `<= 0` check and would train silently."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            _check_finite_floats(value, prefix=f"{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            _fail(name, f"must be a finite number, got {value}")


def warn_schedule(config: ml_collections.ConfigDict, total_steps: int) -> None:
    """Logs once when the warmup is longer than the run (the peak rate is never reached)."""
    warmup = config.optim.warmup_steps
    if warmup > total_steps:
        logging.warning("optim.warmup_steps=%d is longer than the run's %d steps: the learning "
                        "rate reaches only %.3g of optim.learning_rate=%g", warmup, total_steps,
                        total_steps / warmup, config.optim.learning_rate)


DEFAULT_TOKENS_PER_PARAM = 20.0


def _check_budget(t: ml_collections.ConfigDict) -> None:
    for key in ("steps", "tokens", "tokens_per_param"):
        if t[key] < 0:
            _fail(f"train.{key}", f"must be >= 0, got {t[key]}")
    if t.param_convention not in scaling.PARAM_CONVENTIONS:
        _fail("train.param_convention", f"{t.param_convention!r} is not one of "
              f"{scaling.PARAM_CONVENTIONS}")
    given = [key for key in ("steps", "tokens", "tokens_per_param") if t[key] > 0]
    if len(given) > 1:
        _fail(f"train.{given[1]}", f"{t[given[1]]} conflicts with train.{given[0]}="
              f"{t[given[0]]}: a run has one length; set the other to 0")


def resolve_steps(config: ml_collections.ConfigDict,
                  model_cfg: ModelConfig) -> ml_collections.ConfigDict:
    """The config with `train.steps` set from its token budget (a copy; unchanged if steps > 0).

    The one place where `train.tokens` / `train.tokens_per_param` become steps: tokens per
    parameter counts parameters as `train.param_convention` says (`scaling.param_count`), and
    steps = ceil(tokens / (train.global_batch_size * data.seq_len)), so a run trains on at least
    its budget.
    """
    t = config.train
    _check_budget(t)
    if t.steps > 0:
        return config
    if t.tokens > 0:
        tokens = t.tokens
    else:
        per_param = t.tokens_per_param or DEFAULT_TOKENS_PER_PARAM
        tokens = per_param * scaling.param_count(model_cfg, t.param_convention)
    resolved = config.copy_and_resolve_references()
    resolved.train.steps = max(1, -(-int(tokens) // tokens_per_step(config)))
    return resolved


def check_devices(config: ml_collections.ConfigDict, num_devices: int,
                  num_processes: int = 1) -> dict[str, int]:
    """Checks the mesh and batch against the devices; returns the resolved mesh shape."""
    shape = resolve_mesh_shape({a: config.mesh[a] for a in MESH_AXES}, num_devices)
    dp = shape["data"] * shape["fsdp"] * shape["expert"]
    batch = config.train.global_batch_size
    if batch % dp:
        _fail("train.global_batch_size", f"{batch} is not divisible by the data-parallel size "
              f"{dp} (mesh.data * mesh.fsdp * mesh.expert)")
    experts = config.model.moe.num_experts
    if shape["expert"] > 1 and experts % shape["expert"]:
        _fail("mesh.expert", f"{shape['expert']} does not divide model.moe.num_experts="
              f"{experts}")
    if batch % num_processes:
        _fail("train.global_batch_size", f"{batch} is not divisible by the {num_processes} "
              "processes")
    accum = config.optim.grad_accum_steps
    if (batch // dp) % accum:
        _fail("optim.grad_accum_steps", f"{accum} microbatches do not divide the per-replica "
              f"batch {batch // dp} (train.global_batch_size / data-parallel size {dp})")
    m = config.train.pipeline_microbatches
    if (batch // dp // accum) % m:
        _fail("train.pipeline_microbatches", f"{m} pipeline microbatches do not divide the "
              f"per-replica batch of one accumulation step, {batch // dp // accum} "
              f"(train.global_batch_size / data-parallel size {dp} / optim.grad_accum_steps)")
    return shape


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
    return config.train.global_batch_size * config.data.seq_len


def describe(config: ml_collections.ConfigDict) -> str:
    """A short one-line summary for logs."""
    m = config.model
    return (f"stage={config.stage} d_model={m.d_model} layers={m.num_layers} heads={m.num_heads} "
            f"seq={config.data.seq_len} batch={config.train.global_batch_size} "
            f"steps={config.train.steps} tokens/step={tokens_per_step(config)} "
            f"params_dtype={m.param_dtype} compute_dtype={m.compute_dtype}")


__all__ = ["base_config", "parse_arg", "load_config_file", "validate", "check_devices",
           "model_config", "describe", "tokens_per_step", "pipeline_summary", "resolve_steps",
           "check_renamed_key", "RENAMED_KEYS"]
