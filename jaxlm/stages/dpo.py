"""Preference optimisation: DPO and its variants, one pure step over chosen/rejected pairs.

The batch (jaxlm/data/preference.py) holds each field as [B, 2, L]: [:, 0] the chosen and
[:, 1] the rejected sequence of a pair, both starting with the same prompt ids; loss_mask is 1
on the answer's target tokens only. Both sequences go through the model in one [2B, L] pass.

With policy log-probs pi_c = log pi(chosen | prompt), pi_r likewise (sums over answer tokens),
the reference's ref_c, ref_r, and h = (pi_c - ref_c) - (pi_r - ref_r), the per-pair losses are

    sigmoid (DPO, Rafailov et al. 2023), with label smoothing e (0: plain DPO):
                                           -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
    conservative (cDPO, Mitchell 2023):    the same loss, with e > 0 required
    ipo (Azar et al. 2023):                (h - 1 / (2 beta))^2
    simpo (Meng et al. 2024, reference-free):
                                           -log sigmoid(beta pi_c/|c| - beta pi_r/|r| - gamma)

with |c|, |r| the answers' token counts. Label smoothing on the sigmoid loss is what TRL's
`DPOTrainer` does; ipo and simpo refuse it (dpo.label_smoothing > 0 is an error there).

IPO's convention (`ipo_normalize`, config key dpo.ipo_normalize): Azar et al. write h with
summed log-probs; TRL divides each sequence's log-probs (policy and reference) by its answer
length before the IPO loss, so h = (pi_c - ref_c)/|c| - (pi_r - ref_r)/|r|. The two put beta on
different scales (a published IPO beta carries over only with the same convention); the default
is the length-normalised one, the common practice (TRL). The implicit rewards are beta times
the log-ratios that enter the loss: beta (pi - ref), per token for normalised ipo (simpo:
beta pi / |y|); metrics report their means over pairs, their margin, the reward accuracy (share
of pairs whose chosen reward is higher) and the mean policy log-probs.

The reference log-probs come from the frozen initial params (the init_from checkpoint), either
computed inside the jitted step (dpo.reference="jit"; the frozen params are the step's third
argument, sharded like the policy) or once before training by `prepare` with the Program's
"reference_logps" program (dpo.reference="precompute"; the batch then carries them as
ref_logps [B, 2]).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxlm.losses.cross_entropy import token_logps
from jaxlm.models.moe import add_router_losses, router_metrics
from jaxlm.parallel import sharding
from jaxlm.run.errors import ConfigError
from jaxlm.run.train_state import TrainState, gradient_step, lora_step_options
from jaxlm.scaling import flops as scaling
from jaxlm.stages import pairs
from jaxlm.stages.settings import DPO
from jaxlm.stages.stage import (
    BatchFields,
    JitProgram,
    Stage,
    example_eval_batches,
    section_heldout_key,
)

Batch = dict[str, jax.Array]
_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def sequence_logps(params: Any, batch: Batch, *, model: nn.Module,
                   rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Any]:
    """(sum of log p(target) over loss_mask, number of masked tokens), each [B, 2], and the
    model's sown intermediates (MoE router stats). `rng` feeds dropout (LoRA) in training.
    The log-probs come from the hidden states chunk by chunk (`token_logps`): no [2B, L, V]
    logits exist, forward or backward."""
    b, two = batch["inputs"].shape[:2]
    flat = pairs.flatten(batch, _FIELDS)
    (hidden_NxLxD, head_VxD), variables = pairs.apply(params, flat, model=model, rng=rng,
                                                      return_hidden=True)
    token_NxL = token_logps(hidden_NxLxD, head_VxD, flat["targets"],
                            vocab_size=model.cfg.vocab_size,
                            logit_softcap=model.cfg.final_logit_softcap)
    mask_NxL = flat["loss_mask"].astype(jnp.float32)
    return ((token_NxL * mask_NxL).sum(-1).reshape(b, two),
            mask_NxL.sum(-1).reshape(b, two), variables)


def preference_loss(policy_Bx2: jax.Array, reference_Bx2: jax.Array | None,
                    lengths_Bx2: jax.Array, *, variant: str, beta: float,
                    label_smoothing: float = 0.0, gamma: float = 0.0,
                    ipo_normalize: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair (loss [B], chosen reward [B], rejected reward [B]); see the module doc."""
    if label_smoothing and variant not in ("sigmoid", "conservative"):
        raise ConfigError(f"config key dpo.label_smoothing: {label_smoothing} has no effect on "
                         f"dpo.variant={variant!r}; it smooths the sigmoid loss (sigmoid, "
                         "conservative) only, set it to 0")
    if variant == "simpo":
        rewards_Bx2 = beta * policy_Bx2 / jnp.maximum(lengths_Bx2, 1.0)
        margin_B = rewards_Bx2[:, 0] - rewards_Bx2[:, 1]
        return -jax.nn.log_sigmoid(margin_B - gamma), rewards_Bx2[:, 0], rewards_Bx2[:, 1]
    logratio_Bx2 = policy_Bx2 - reference_Bx2
    if variant == "ipo" and ipo_normalize:
        logratio_Bx2 = logratio_Bx2 / jnp.maximum(lengths_Bx2, 1.0)
    h_B = logratio_Bx2[:, 0] - logratio_Bx2[:, 1]
    if variant in ("sigmoid", "conservative"):
        loss_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_B)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h_B))
    elif variant == "ipo":
        loss_B = jnp.square(h_B - 1.0 / (2.0 * beta))
    else:
        raise ConfigError(f"config key dpo.variant: unknown {variant!r}")
    rewards_Bx2 = beta * logratio_Bx2
    return loss_B, rewards_Bx2[:, 0], rewards_Bx2[:, 1]


def pair_sums(loss_B: jax.Array, chosen_B: jax.Array, rejected_B: jax.Array,
              policy_Bx2: jax.Array, valid_B: jax.Array) -> dict[str, jax.Array]:
    """Sums over the valid pairs of a batch; divide by num_pairs for means."""
    v = valid_B.astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss_B * v), "chosen_reward_sum": jnp.sum(chosen_B * v),
            "rejected_reward_sum": jnp.sum(rejected_B * v),
            "correct": jnp.sum((chosen_B > rejected_B) * v),
            "chosen_logp_sum": jnp.sum(policy_Bx2[:, 0] * v),
            "rejected_logp_sum": jnp.sum(policy_Bx2[:, 1] * v), "num_pairs": jnp.sum(v)}


def means(sums: dict[str, jax.Array], prefix: str = "") -> dict[str, jax.Array]:
    """Metrics (means over pairs) from `pair_sums` added up over batches."""
    n = jnp.maximum(sums["num_pairs"], 1.0)
    chosen, rejected = sums["chosen_reward_sum"] / n, sums["rejected_reward_sum"] / n
    return {f"{prefix}loss": sums["loss_sum"] / n, f"{prefix}reward_accuracy": sums["correct"] / n,
            f"{prefix}chosen_reward": chosen, f"{prefix}rejected_reward": rejected,
            f"{prefix}reward_margin": chosen - rejected,
            f"{prefix}chosen_logp": sums["chosen_logp_sum"] / n,
            f"{prefix}rejected_logp": sums["rejected_logp_sum"] / n}


def loss_fn(params: Any, batch: Batch, reference_Bx2: jax.Array | None, *, model: nn.Module,
            variant: str, beta: float, label_smoothing: float, gamma: float,
            ipo_normalize: bool = True, rng: jax.Array | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum of per-pair losses over the batch, and the pair sums (num_pairs as num_tokens, the
    weight `microbatched_grads` divides by). A mixture-of-experts policy's router losses are
    added per pair (`add_router_losses`)."""
    policy_Bx2, lengths_Bx2, variables = sequence_logps(params, batch, model=model, rng=rng)
    loss_B, chosen_B, rejected_B = preference_loss(
        policy_Bx2, reference_Bx2, lengths_Bx2, variant=variant, beta=beta,
        label_smoothing=label_smoothing, gamma=gamma, ipo_normalize=ipo_normalize)
    valid_B = (lengths_Bx2 > 0).all(axis=-1)
    sums = pair_sums(loss_B, chosen_B, rejected_B, policy_Bx2, valid_B)
    return add_router_losses(sums["loss_sum"], {**sums, "num_tokens": sums["num_pairs"]},
                             variables, model.cfg)


def _reference(batch: Batch, ref_params: Any, model: nn.Module) -> jax.Array | None:
    if "ref_logps" in batch:
        return batch["ref_logps"]
    if ref_params is None:
        return None
    return jax.lax.stop_gradient(sequence_logps(ref_params, batch, model=model)[0])


def dpo_step(state: TrainState, batch: Batch, ref_params: Any = None, *, model: nn.Module,
             tx: optax.GradientTransformation, lr_schedule: optax.Schedule, variant: str,
             beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
             ipo_normalize: bool = True, grad_accum_steps: int = 1, freeze: Any = None,
             dropout_seed: int | None = None
             ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the mean preference loss over the pairs of `batch`."""

    def micro_loss(p: Any, b: Batch, rng: jax.Array | None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
        return loss_fn(p, b, _reference(b, ref_params, model), model=model, variant=variant,
                       beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                       ipo_normalize=ipo_normalize, rng=rng)

    new_state, sums, common = gradient_step(
        state, batch, micro_loss, tx=tx, lr_schedule=lr_schedule,
        grad_accum_steps=grad_accum_steps, freeze=freeze, dropout_seed=dropout_seed)
    n = jnp.maximum(sums["num_pairs"], 1.0)
    metrics = {**means(sums), **common, "num_pairs": sums["num_pairs"],
               **router_metrics(sums, n)}
    return new_state, metrics


def eval_step(params: Any, batch: Batch, ref_params: Any = None, *, model: nn.Module,
              variant: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
              ipo_normalize: bool = True) -> dict[str, jax.Array]:
    """Pair sums over one held-out batch (`eval_metrics` turns their totals into means)."""
    _, sums = loss_fn(params, batch, _reference(batch, ref_params, model), model=model,
                      variant=variant, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                      ipo_normalize=ipo_normalize)
    return {k: v for k, v in sums.items() if k != "num_tokens" and not k.startswith("moe_")}


def eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in means(totals, prefix="eval_").items()}


def reference_mode(config: Any) -> str:
    """Where the reference log-probs come from: "none" (simpo), "jit" (frozen params as the
    steps' third argument) or "precompute" (a table of reference log-probs per pair, built by
    `prepare` before training and handed to make_data)."""
    return "none" if config.dpo.variant == "simpo" else config.dpo.reference


def reference_step(params: Any, batch: Batch, *, model: nn.Module) -> jax.Array:
    """[B, 2] log-probs of chosen and rejected: one row of the precomputed table per pair."""
    return sequence_logps(params, batch, model=model)[0]


def make_steps(config: Any, model: nn.Module, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule) -> tuple[Any, Any]:
    d = config.dpo
    settings = dict(model=model, variant=d.variant, beta=d.beta,
                    label_smoothing=d.label_smoothing, gamma=d.simpo_gamma,
                    ipo_normalize=d.ipo_normalize)
    train = functools.partial(dpo_step, tx=tx, lr_schedule=lr_schedule,
                              grad_accum_steps=config.optim.grad_accum_steps,
                              **lora_step_options(config), **settings)
    return train, functools.partial(eval_step, **settings)


def make_data(config: Any, tokenizer: Any, *, split: str, batch_size: int, process_index: int,
              process_count: int, cache_dir: str, reference: Any = None) -> Any:
    """Pair batches (jaxlm/data/preference.py); `reference` maps split -> [N, 2] table."""
    del cache_dir
    from jaxlm.data.preference import make_pair_iterator
    return make_pair_iterator(config, tokenizer, split=split, batch_size=batch_size,
                              process_index=process_index, process_count=process_count,
                              reference_Nx2=None if reference is None else reference[split])


def reference_batches(config: Any, tokenizer: Any, *, split: str, batch_size: int,
                      process_index: int, process_count: int) -> Any:
    """Every pair of `split` once, in pair_id order (pad rows have pair_id -1)."""
    from jaxlm.data.preference import one_pass_batches
    return one_pass_batches(config, tokenizer, split=split, batch_size=batch_size,
                            process_index=process_index, process_count=process_count)


def batch_fields(config: Any) -> BatchFields:
    fields = pairs.batch_fields(config)
    if reference_mode(config) == "precompute":
        fields["ref_logps"] = ((2,), np.float32)
    return fields


# The Program's reference precompute (`Program.programs` name).
REFERENCE_LOGPS = "reference_logps"


def _reference_with_ids(params: Any, batch: Batch, *, model: nn.Module
                        ) -> tuple[jax.Array, jax.Array]:
    return reference_step(params, batch, model=model), batch["pair_id"]


def make_programs(program: Any) -> dict[str, JitProgram]:
    """dpo.reference="precompute": the jitted reference pass over one global batch of pairs
    (params sharded like the policy, rows over the data axes), whose values and pair ids come
    back replicated on every process. It runs before training, not in the steps."""
    c, mesh = program.config, program.mesh
    if reference_mode(c) != "precompute":
        return {}
    fields = pairs.batch_fields(c)
    batch_sh = {k: sharding.batch_sharding(mesh, 1 + len(shape))
                for k, (shape, _) in fields.items()}
    fn = jax.jit(functools.partial(_reference_with_ids, model=program.model),
                 in_shardings=(program.reference_shardings, batch_sh),
                 out_shardings=sharding.replicated(mesh))
    rows = c.train.global_batch_size
    batch = {k: jax.ShapeDtypeStruct((rows, *shape), dtype, sharding=batch_sh[k])
             for k, (shape, dtype) in fields.items()}
    seq_len = c.data.seq_len
    flops = (rows * pairs.SEQUENCES_PER_ROW * seq_len
             * scaling.forward_flops_per_token(program.model_cfg, seq_len))
    return {REFERENCE_LOGPS: JitProgram(fn, (program.abstract_params, batch), flops=flops,
                                        per_step=False, reads=("params",))}


def prepare(program: Any, tokenizer: Any, reference_params: Any) -> dict[str, Any]:
    """dpo.reference="precompute": the reference log-probs of every pair of each split, one
    pass of the Program's "reference_logps" over `reference_batches`, as make_data's `reference`
    tables (split -> [N, 2], row = pair_id). The reference params can be dropped afterwards."""
    c, mesh = program.config, program.mesh
    jitted = program.programs[REFERENCE_LOGPS]
    tables = {}
    with sharding.activate(mesh):
        for split in ("train", "eval"):
            if split == "eval" and not STAGE.eval_batches(c):
                continue
            rows: dict[int, Any] = {}
            for local in reference_batches(
                    c, tokenizer, split=split, batch_size=c.train.global_batch_size,
                    process_index=jax.process_index(), process_count=jax.process_count()):
                values, ids = jax.device_get(
                    jitted(reference_params, sharding.global_batch(local, mesh)))
                rows.update((int(i), v) for i, v in zip(ids, values) if i >= 0)
            tables[split] = np.stack([rows[i] for i in range(len(rows))])
            logging.info("reference log-probs precomputed for %d %s examples", len(rows), split)
    return {"reference": tables}


STAGE = Stage(name="dpo", make_steps=make_steps, make_data=make_data, batch_fields=batch_fields,
              sections=(DPO,),
              heldout_key=section_heldout_key('dpo'), sequences_per_row=pairs.SEQUENCES_PER_ROW,
              eval_metrics=eval_metrics, reference_mode=reference_mode,
              make_programs=make_programs, prepare=prepare,
              eval_batches=example_eval_batches)
