"""trainer.evaluate: the eval batches are built once and reused while they fit in the host
cache; the metrics are those of a fresh iterator every time."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxlm.parallel import sharding
from jaxlm.run import trainer
from jaxlm.stages.stage import token_eval_batches, token_eval_metrics


class _CountingStage(types.SimpleNamespace):
    """A stage whose eval data is 3 fixed batches of token sums; counts make_data calls."""

    eval_metrics = staticmethod(token_eval_metrics)
    eval_batches = staticmethod(token_eval_batches)

    def make_data(self, config, tokenizer, *, split, batch_size, **kwargs):
        del config, tokenizer, kwargs
        self.calls += 1
        rng = np.random.default_rng(0 if split == "eval" else 1)
        return iter([{"inputs": rng.integers(0, 9, (batch_size, 8)).astype(np.int32)}
                     for _ in range(3)])


def _setup(stage):
    config = ml_collections.ConfigDict({"train": {"global_batch_size": 8},
                                        "data": {"seq_len": 8}, "eval": {"tokens": 3 * 8 * 8}})
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1},
                              devices=jax.devices()[:1])
    return trainer.Setup(config=config, workdir="", mesh=mesh, tokenizer=None, stage=stage,
                         cache_dir="")


def _eval_fn(params, batch):
    x = batch["inputs"].astype(jnp.float32) * params
    size = jnp.asarray(x.size, jnp.float32)
    return {"nll_sum": jnp.sum(x), "correct": jnp.sum(x > 4), "num_tokens": size}


def test_eval_batches_are_read_once_and_give_the_same_metrics():
    stage = _CountingStage(calls=0)
    s = _setup(stage)
    first = trainer.evaluate(s, _eval_fn, jnp.float32(1.0))
    again = trainer.evaluate(s, _eval_fn, jnp.float32(1.0))
    assert stage.calls == 1 and len(s.eval_batches) == 3
    assert first == again
    fresh = trainer.evaluate(_setup(_CountingStage(calls=0)), _eval_fn, jnp.float32(1.0))
    assert first == fresh
    # The cached batches are the data, not stale results: other params give other metrics.
    assert trainer.evaluate(s, _eval_fn, jnp.float32(2.0))["eval_loss"] == pytest.approx(
        2 * first["eval_loss"])


def test_eval_batches_over_the_cache_budget_are_read_every_time(monkeypatch):
    monkeypatch.setattr(trainer, "EVAL_CACHE_BYTES", 300)  # one [8, 8] int32 batch is 256 B
    stage = _CountingStage(calls=0)
    s = _setup(stage)
    first = trainer.evaluate(s, _eval_fn, jnp.float32(1.0))
    assert s.eval_batches is None
    assert trainer.evaluate(s, _eval_fn, jnp.float32(1.0)) == first and stage.calls == 2
