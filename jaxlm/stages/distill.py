"""Knowledge distillation: a student trained towards a frozen teacher's next-token distributions.

    python -m jaxlm.main --config=configs/tiny.py --workdir=/tmp/student \
        --config.stage=distill --config.distill.teacher=/tmp/teacher/checkpoints

The student is the run config's model; the teacher is a jaxlm checkpoint (or a Hugging Face
model imported with jaxlm/tools/convert_hf.py), of the shape its own saved config gives, restored
frozen and sharded on the run's mesh (`Stage.frozen_models`, jaxlm/weights/frozen.py). Both models
run inside the step; the loss is

    alpha * cross-entropy(targets) + (1 - alpha) * T^2 * D(teacher_T, student_T)

summed over the loss-masked tokens (jaxlm/losses/distill.py: D is forward KL, reverse KL or the
generalised JSD; both models' logits exist a chunk of tokens at a time). `distill.data` picks
the data: the pretraining corpus (continued pretraining) or the SFT conversations with the
`sft` section's settings (the assistant-only loss mask). The held-out metrics are the student's
cross-entropy (comparable with a pretraining run's) plus the divergence.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxlm.losses.distill import DistillSpec, distill_sums
from jaxlm.models.moe import add_router_losses, router_metrics
from jaxlm.run.train_state import TrainState, gradient_step, lora_step_options
from jaxlm.stages import pretrain, sft
from jaxlm.stages.settings import DISTILL
from jaxlm.stages.stage import Stage, corpus_heldout_key, token_eval_metrics, token_fields

Batch = dict[str, jax.Array]
TEACHER = "teacher"




def spec(config: ml_collections.ConfigDict) -> DistillSpec:
    d = config.distill
    return DistillSpec(kind=d.loss, temperature=float(d.temperature), beta=float(d.beta),
                       top_k=int(d.top_k))


def frozen_models(config: ml_collections.ConfigDict) -> dict[str, tuple[str, int | None]]:
    d = config.distill
    return {TEACHER: (d.teacher, None if d.teacher_step < 0 else d.teacher_step)}


def _hidden(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None = None):
    return model.apply({"params": params}, batch["inputs"], positions_BxL=batch["positions"],
                       segment_ids_BxL=batch["segment_ids"], return_hidden=True,
                       mutable=["intermediates"], rngs=None if rng is None else {"dropout": rng})


def loss_fn(params: Any, batch: Batch, teacher_params: Any, *, model: nn.Module,
            teacher: nn.Module, spec: DistillSpec, alpha: float, rng: jax.Array | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """alpha * nll_sum + (1 - alpha) * kd_sum over the batch, and the sums (jaxlm/distill_loss)."""
    (hidden_BxLxD, head_VxD), variables = _hidden(model, params, batch, rng)
    (t_hidden_BxLxE, t_head_VxE), _ = _hidden(teacher, teacher_params, batch)
    sums = distill_sums(spec, hidden_BxLxD, head_VxD, t_hidden_BxLxE, t_head_VxE,
                        batch["targets"], batch["loss_mask"], vocab_size=model.cfg.vocab_size,
                        alpha=alpha, logit_softcap=model.cfg.final_logit_softcap,
                        teacher_logit_softcap=teacher.cfg.final_logit_softcap)
    return add_router_losses(sums.pop("loss_sum"), sums, variables, model.cfg)


def distill_step(state: TrainState, batch: Batch, frozen: dict[str, Any], *, model: nn.Module,
                 teacher: nn.Module, spec: DistillSpec, alpha: float,
                 tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                 grad_accum_steps: int = 1, freeze: Any = None,
                 dropout_seed: int | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the mean distillation objective of `batch`."""
    teacher_params = frozen[TEACHER]
    new_state, aux, common = gradient_step(
        state, batch, lambda p, b, rng: loss_fn(p, b, teacher_params, model=model,
                                                teacher=teacher, spec=spec, alpha=alpha, rng=rng),
        tx=tx, lr_schedule=lr_schedule, grad_accum_steps=grad_accum_steps, freeze=freeze,
        dropout_seed=dropout_seed)
    num_tokens = jnp.maximum(aux["num_tokens"], 1.0)
    loss = aux["nll_sum"] / num_tokens
    kd = aux["kd_sum"] / num_tokens
    metrics = {"loss": loss, "perplexity": jnp.exp(loss), "kd": kd,
               "objective": alpha * loss + (1.0 - alpha) * kd,
               "accuracy": aux["correct"] / num_tokens, "num_tokens": aux["num_tokens"],
               **common, **router_metrics(aux, num_tokens)}
    return new_state, metrics


def eval_step(params: Any, batch: Batch, frozen: dict[str, Any], *, model: nn.Module,
              teacher: nn.Module, spec: DistillSpec) -> dict[str, jax.Array]:
    """The student's held-out sums: cross-entropy, accuracy and the divergence."""
    _, sums = loss_fn(params, batch, frozen[TEACHER], model=model, teacher=teacher, spec=spec,
                      alpha=1.0)
    return {k: sums[k] for k in ("nll_sum", "kd_sum", "correct", "num_tokens")}


def eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    out = token_eval_metrics(totals)
    out["eval_kd"] = totals.get("kd_sum", 0.0) / max(totals.get("num_tokens", 0.0), 1.0)
    return out


def make_steps(config: Any, model: nn.Module, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule, *, frozen: dict[str, Any]) -> tuple[Any, Any]:
    """Binds the static settings (un-jitted); `frozen[TEACHER].model` is the teacher."""
    teacher, s = frozen[TEACHER].model, spec(config)
    train = functools.partial(
        distill_step, model=model, teacher=teacher, spec=s, alpha=float(config.distill.alpha),
        tx=tx, lr_schedule=lr_schedule, grad_accum_steps=config.optim.grad_accum_steps,
        **lora_step_options(config))
    return train, functools.partial(eval_step, model=model, teacher=teacher, spec=s)


def make_data(config: Any, tokenizer: Any, **kwargs: Any) -> Any:
    """The pretraining corpus, or (distill.data="chat") the SFT conversations."""
    source = sft if config.distill.data == "chat" else pretrain
    return source.make_data(config, tokenizer, **kwargs)


def batch_fields(config: Any) -> dict[str, Any]:
    return token_fields(config.data.seq_len)


def heldout_key(config: ml_collections.ConfigDict) -> str | None:
    """The held-out files of the data distill.data picks: the corpus's or the chat's."""
    return "sft.eval_paths" if config.distill.data == "chat" else corpus_heldout_key(config)


STAGE = Stage(name="distill", make_steps=make_steps, make_data=make_data,
              batch_fields=batch_fields, sections=(DISTILL,), eval_metrics=eval_metrics,
              frozen_models=frozen_models, heldout_key=heldout_key)
