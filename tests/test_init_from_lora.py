"""init_from a LoRA run's checkpoint: its trained adapters are merged into the base weights
(W + (alpha / r) A B) instead of being dropped, for a plain run and for a LoRA run of another
rank, whose own adapters then start fresh (B = 0)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxlm.models import Transformer, lora
from jaxlm.run import trainer
from jaxlm.run.config import base_config
from jaxlm.run.train_state import abstract_boxed_params
from jaxlm.weights import restore

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

SEQ = 16


def _config(tmp_path, steps, rank=0):
    c = base_config()
    c.model.num_layers, c.model.d_model, c.model.d_ff = 1, 32, 64
    c.model.num_heads, c.model.num_kv_heads = 2, 1
    c.data.seq_len, c.data.vocab_size, c.data.max_documents = SEQ, 400, 60
    c.data.cache_dir = str(tmp_path / "cache")
    c.train.global_batch_size, c.train.steps, c.eval.every_steps = 8, steps, 0
    c.optim.warmup_steps, c.optim.learning_rate = 1, 3e-2
    c.log.sample_every, c.log.tensorboard, c.log.every_steps = 0, False, 1
    c.checkpoint.every_steps, c.checkpoint.async_save = 0, False
    c.model.lora.rank, c.model.lora.alpha = rank, 8.0
    return c


def _initial_params(config, workdir):
    """The params a run of `config` in the empty `workdir` starts from, on the host."""
    s = trainer.setup(config, str(workdir))
    ckpt = trainer._checkpointer(config, str(workdir))
    try:
        state = trainer.initial_state(s, ckpt, train_iter=None)
    finally:
        ckpt.close()
    return s, jax.device_get(state.params)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A rank-4 LoRA run of 3 steps and its saved params (adapters trained, B != 0)."""
    base = tmp_path_factory.mktemp("lora_init")
    config = _config(base, steps=3, rank=4)
    trainer.run(config, str(base / "lora"))
    s = trainer.setup(config, str(base / "lora"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            nn.meta.unbox(abstract_boxed_params(s.program.model, SEQ)))
    checkpoints = str(base / "lora" / "checkpoints")
    saved = jax.device_get(restore.restore(checkpoints, model_cfg=s.program.model_cfg,
                                           abstract_params=abstract).params)
    return base, checkpoints, saved


def _flat(params):
    return traverse_util.flatten_dict(params, sep="/")


def test_saved_adapters_were_trained(lora_run):
    _, _, saved = lora_run
    b = [v for k, v in _flat(saved).items() if k.endswith(lora.SUFFIX_B)]
    assert len(b) == 4 and all(np.abs(x).max() > 0 for x in b)


def test_plain_run_from_a_lora_checkpoint_gets_the_merged_weights(lora_run, caplog):
    base, checkpoints, saved = lora_run
    config = _config(base, steps=2)
    config.init_from.path = checkpoints
    with caplog.at_level("INFO", logger="absl"):
        _, params = _initial_params(config, base / "plain")
    assert "merged its LoRA adapters (rank 4, alpha 8" in caplog.text
    merged = _flat(jax.device_get(lora.merge(saved, 4, 8.0)))
    got = _flat(params)
    assert got.keys() == merged.keys()
    for name, value in merged.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    # The merge really moved the adapted weights away from the saved base weights.
    wq = next(k for k in merged if k.endswith("/wq"))
    assert np.abs(got[wq] - _flat(saved)[wq]).max() > 1e-4


def test_lora_run_of_another_rank_starts_from_the_merged_model(lora_run):
    base, checkpoints, saved = lora_run
    config = _config(base, steps=2, rank=2)
    config.init_from.path = checkpoints
    s, params = _initial_params(config, base / "rank2")
    merged = _flat(jax.device_get(lora.merge(saved, 4, 8.0)))
    got = _flat(params)
    adapters = {k: v for k, v in got.items() if k.endswith((lora.SUFFIX_A, lora.SUFFIX_B))}
    assert len(adapters) == 8
    for name, value in adapters.items():
        # [layer, in..., r] and [layer, r, out...]
        assert value.shape[-1 if name.endswith(lora.SUFFIX_A) else 1] == 2, (name, value.shape)
        if name.endswith(lora.SUFFIX_B):
            assert not np.any(value), name  # fresh adapters: B = 0
        else:
            assert np.abs(value).max() > 0, name
    for name, value in merged.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    # Same logits as the plain model with the merged weights.
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 300, (2, SEQ)), jnp.int32)
    plain = Transformer(dataclasses.replace(s.program.model_cfg, lora_rank=0))
    want = plain.apply({"params": lora.merge(saved, 4, 8.0)}, tokens)
    logits = s.program.model.apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-5)

