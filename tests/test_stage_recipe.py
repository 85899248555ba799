"""docs/architecture.md's "How to add a stage" holds: a stage written from the recipe alone (one
module, one registry line) trains through the unchanged trainer, with its own loss."""

import json
import sys

import pytest

from jaxlm.run import config as config_lib
from jaxlm.run import trainer
from jaxlm.stages import STAGE_MODULES
from tests.run_fixtures import tiny_run_config

# The whole stage, as a user would write jaxlm/stages/smoothed.py: label-smoothed next-token
# cross-entropy, its pure train and eval steps, the pretraining data.
pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

STAGE_MODULE = '''
import functools

import jax
import jax.numpy as jnp

from jaxlm.run.train_state import gradient_step
from jaxlm.stages import pretrain
from jaxlm.stages.stage import Stage, token_fields

SMOOTHING = 0.1


def loss_fn(params, batch, *, model):
    logits_BxLxV = model.apply({"params": params}, batch["inputs"],
                               positions_BxL=batch["positions"],
                               segment_ids_BxL=batch["segment_ids"])
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[..., :model.cfg.vocab_size].astype(jnp.float32))
    nll_BxL = -jnp.take_along_axis(logp_BxLxV, batch["targets"][..., None], -1)[..., 0]
    loss_BxL = (1 - SMOOTHING) * nll_BxL - SMOOTHING * logp_BxLxV.mean(-1)
    mask_BxL = batch["loss_mask"]
    correct_BxL = jnp.argmax(logp_BxLxV, -1) == batch["targets"]
    return jnp.sum(loss_BxL * mask_BxL), {"nll_sum": jnp.sum(nll_BxL * mask_BxL),
                                          "correct": jnp.sum(correct_BxL * mask_BxL),
                                          "num_tokens": jnp.sum(mask_BxL)}


def train_step(state, batch, *, model, tx, lr_schedule):
    state, aux, common = gradient_step(state, batch, lambda p, b, rng: loss_fn(p, b, model=model),
                                       tx=tx, lr_schedule=lr_schedule)
    return state, {"loss": aux["nll_sum"] / jnp.maximum(aux["num_tokens"], 1.0),
                   "num_tokens": aux["num_tokens"], **common}


def eval_step(params, batch, *, model):
    return loss_fn(params, batch, model=model)[1]


def make_steps(config, model, tx, lr_schedule):
    return (functools.partial(train_step, model=model, tx=tx, lr_schedule=lr_schedule),
            functools.partial(eval_step, model=model))


STAGE = Stage(name="smoothed", make_steps=make_steps, make_data=pretrain.make_data,
              batch_fields=lambda config: token_fields(config.data.seq_len))
'''


@pytest.fixture
def smoothed_stage(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "smoothed_stage.py").write_text(STAGE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.setitem(STAGE_MODULES, "smoothed", "smoothed_stage")  # the registry line
    yield
    sys.modules.pop("smoothed_stage", None)


def test_a_stage_from_the_recipe_trains(tmp_path, smoothed_stage):
    steps = 12
    c = tiny_run_config(tmp_path, steps=steps)
    c.stage = "smoothed"
    c.optim.learning_rate = 1e-2
    c.eval.tokens = 2 * c.train.global_batch_size * c.data.seq_len
    config_lib.validate(c)
    trainer.run(c, str(tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == steps
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    evals = [row for row in rows if "eval_loss" in row]
    assert len(evals) == 1 and evals[0]["step"] == steps
    assert evals[0]["eval_loss"] < losses[0]
