"""config.init_from: a run starts from another run's params with a fresh optimizer."""

import jax
import numpy as np
import pytest

from jaxlm.run import trainer
from jaxlm.run.config import base_config

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds


def _config(tmp_path, steps):
    c = base_config()
    c.model.num_layers, c.model.d_model, c.model.d_ff = 1, 32, 64
    c.data.seq_len, c.data.vocab_size, c.data.max_documents = 16, 400, 60
    c.data.cache_dir = str(tmp_path / "cache")
    c.train.global_batch_size, c.train.steps, c.eval.every_steps = 8, steps, 0
    c.optim.warmup_steps = 1
    c.log.sample_every, c.log.tensorboard, c.log.every_steps = 0, False, 1
    c.checkpoint.every_steps = 2
    return c


def test_init_from_loads_params_only_and_resume_wins(tmp_path):
    first = _config(tmp_path, steps=2)
    trainer.run(first, str(tmp_path / "pretrain"))

    second = _config(tmp_path, steps=3)
    second.init_from.path = str(tmp_path / "pretrain" / "checkpoints")
    s = trainer.setup(second, str(tmp_path / "sft"))
    ckpt = trainer._checkpointer(second, str(tmp_path / "sft"))
    state = trainer.initial_state(s, ckpt, train_iter=None)
    source = trainer._checkpointer(first, str(tmp_path / "pretrain"))
    trained = trainer.initial_state(trainer.setup(first, str(tmp_path / "pretrain")), source,
                                    train_iter=None)
    ckpt.close()
    source.close()
    assert int(state.step) == 0 and int(trained.step) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
                 jax.device_get(trained.params))
    mu = jax.tree.leaves(state.opt_state)
    assert all(not np.any(np.asarray(x)) for x in mu if np.ndim(x) > 0)  # fresh moments


def test_init_from_a_missing_directory_names_it(tmp_path):
    c = _config(tmp_path, steps=1)
    c.init_from.path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        trainer.run(c, str(tmp_path / "run"))
