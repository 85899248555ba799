"""Pretraining: next-token cross-entropy over packed documents.

`pretrain_step(state, batch) -> (state, metrics)` is pure; `make_steps` binds the static settings
(model, optimizer, z-loss, gradient accumulation, LoRA) with functools.partial and the program
builder (jaxlm/run/program.py) jits it with explicit shardings. The batch layout is the data
pipeline's: inputs, targets, segment_ids, positions and loss_mask, each [B, L]; loss_mask is 0 on
padding and where a target crosses a document boundary.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm.losses.cross_entropy import fused_cross_entropy_sum
from jaxlm.models.moe import add_router_losses, router_metrics
from jaxlm.run.train_state import TrainState, gradient_step, lora_step_options
from jaxlm.stages.stage import Stage, token_fields

Batch = dict[str, jax.Array]


def loss_fn(params: Any, batch: Batch, *, model: nn.Module, z_loss: float = 0.0,
            rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed next-token loss and its aux sums; the logits are never materialised whole.

    The model returns its final hidden states and vocab head and `fused_cross_entropy_sum`
    builds the logits a chunk of tokens at a time (equal to `cross_entropy_sum` on the logits).
    A mixture-of-experts model's router losses are added (`add_router_losses`). `rng` feeds
    the model's dropout (LoRA adapters); None in evaluation.
    """
    (hidden_BxLxD, head_VxD), variables = model.apply(
        {"params": params}, batch["inputs"], positions_BxL=batch["positions"],
        segment_ids_BxL=batch["segment_ids"], return_hidden=True, mutable=["intermediates"],
        rngs=None if rng is None else {"dropout": rng})
    loss_sum, aux = fused_cross_entropy_sum(hidden_BxLxD, head_VxD, batch["targets"],
                                            batch["loss_mask"], z_loss,
                                            vocab_size=model.cfg.vocab_size,
                                            logit_softcap=model.cfg.final_logit_softcap)
    return add_router_losses(loss_sum, aux, variables, model.cfg)


def pretrain_step(state: TrainState, batch: Batch, *, model: nn.Module,
                  tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                  z_loss: float = 0.0, grad_accum_steps: int = 1, freeze: Any = None,
                  dropout_seed: int | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the mean next-token loss of `batch`."""
    new_state, aux, common = gradient_step(
        state, batch, lambda p, b, rng: loss_fn(p, b, model=model, z_loss=z_loss, rng=rng),
        tx=tx, lr_schedule=lr_schedule, grad_accum_steps=grad_accum_steps, freeze=freeze,
        dropout_seed=dropout_seed)
    num_tokens = jnp.maximum(aux["num_tokens"], 1.0)
    loss = aux["nll_sum"] / num_tokens
    metrics = {
        "loss": loss,
        "perplexity": jnp.exp(loss),
        "accuracy": aux["correct"] / num_tokens,
        "z_loss": aux["z_loss_sum"] / num_tokens,
        "num_tokens": aux["num_tokens"],
        **common,
        **router_metrics(aux, num_tokens),
    }
    return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
    """Sums over one held-out batch; the trainer adds them up and divides by num_tokens."""
    _, aux = loss_fn(params, batch, model=model)
    return {"nll_sum": aux["nll_sum"], "correct": aux["correct"], "num_tokens": aux["num_tokens"]}


def step_settings(config: Any) -> dict[str, Any]:
    """The static keyword settings of the token-loss steps (pretrain_step, sft_step)."""
    return dict(z_loss=config.optim.z_loss, grad_accum_steps=config.optim.grad_accum_steps,
                **lora_step_options(config))


def make_steps(config: Any, model: nn.Module, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule, *, step_fn: Any = pretrain_step) -> tuple[Any, Any]:
    """Binds the static settings of this stage's steps (un-jitted; `program.build` jits them).
    `step_fn`: a step with pretrain_step's settings (sft_step)."""
    train = functools.partial(step_fn, model=model, tx=tx, lr_schedule=lr_schedule,
                              **step_settings(config))
    return train, functools.partial(eval_step, model=model)


def make_data(config: Any, tokenizer: Any, *, split: str, batch_size: int, process_index: int,
              process_count: int, cache_dir: str) -> Any:
    """The packed next-token iterator of the data pipeline; for "eval", the batches of the
    held-out sample (jaxlm/data/eval_sample.py) of eval.tokens tokens, repeating."""
    # grain only when data is needed
    from jaxlm.data.eval_sample import make_eval_sample
    from jaxlm.data.pipeline import make_pretrain_iterator
    if split == "eval":
        sample = make_eval_sample(config.data, tokenizer, tokens=max(1, config.eval.tokens),
                                  batch_size=batch_size, process_index=process_index,
                                  process_count=process_count, cache_dir=cache_dir)
        return itertools.cycle(sample.batches)
    return make_pretrain_iterator(config.data, tokenizer, split=split, batch_size=batch_size,
                                  process_index=process_index, process_count=process_count,
                                  cache_dir=cache_dir)


def batch_fields(config: Any) -> dict[str, Any]:
    return token_fields(config.data.seq_len)


STAGE = Stage(name="pretrain", make_steps=make_steps, make_data=make_data,
              batch_fields=batch_fields)
