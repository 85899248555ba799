"""One trainer loop for every stage: a stage the trainer has never heard of (the default step
loop) and an RL stage (its rollout loop) both run through `trainer.run`, and their throughput
and MFU come from the Program's counts in the same way (the RL rollout's FLOPs included)."""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np
import pytest

from jaxlm.run import config as config_lib
from jaxlm.run import program as program_lib
from jaxlm.run import trainer
from jaxlm.run.checkpoint import read_json_items
from jaxlm.stages import STAGE_MODULES, pretrain
from jaxlm.stages.stage import Stage, token_fields
from tests.data_fixtures import train_tiny_tokenizer
from tests.rl_fixtures import grpo_config
from tests.run_metrics import by_step

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

PEAK = 1e11  # log.peak_flops: MFU against a fixed number


def _make_data(config, tokenizer, *, split, batch_size, process_index, process_count,
               cache_dir):
    """Rows of random tokens (a different draw per split), each one document."""
    del tokenizer, process_index, process_count, cache_dir
    rng = np.random.default_rng(0 if split == "train" else 1)
    length = config.data.seq_len
    rows = []
    for tokens in rng.integers(4, 200, (32, length + 1)).astype(np.int32):
        rows.append({"inputs": tokens[:-1], "targets": tokens[1:],
                     "segment_ids": np.ones(length, np.int32),
                     "positions": np.arange(length, dtype=np.int32),
                     "loss_mask": np.ones(length, np.float32)})
    ds = grain.MapDataset.source(rows).repeat().to_iter_dataset()
    return iter(ds.batch(batch_size, drop_remainder=True))


# A stage no part of jaxlm names: pretraining's step on its own data, every other field default.
STAGE = Stage(name="toy", make_steps=pretrain.make_steps, make_data=_make_data,
              batch_fields=lambda config: token_fields(config.data.seq_len))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))).path


def _common(c, tokenizer: str, steps: int):
    c.model.vocab_size = 0  # the tokenizer's
    c.data.tokenizer_path = tokenizer
    c.train.steps = steps
    c.eval.update(every_steps=steps, tokens=c.train.global_batch_size * c.data.seq_len)
    c.checkpoint.update(every_steps=steps, async_save=False)
    c.log.update(every_steps=1, tensorboard=False, peak_flops=PEAK, sample_every=0)
    return c


def _check_throughput(workdir: Path, program: program_lib.Program, steps: int) -> None:
    """Every logged row: tokens/s and MFU are the trainer's, from the Program's tokens and
    FLOPs per step over the measured step time."""
    rows = by_step(workdir, "steps_per_sec")
    assert sorted(rows) == list(range(1, steps + 1))
    for row in rows.values():
        step_s = 1.0 / row["steps_per_sec"]
        assert row["tokens_per_sec"] == pytest.approx(program.tokens_per_step / step_s,
                                                      rel=1e-9)
        assert row["mfu"] == pytest.approx(program.flops_per_step / (step_s * 8 * PEAK),
                                           rel=1e-9)


def test_a_new_stage_runs_on_the_default_step_loop(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setitem(STAGE_MODULES, "toy", __name__)
    c = _common(config_lib.base_config(), tokenizer, steps=3)
    c.stage = "toy"
    c.model.update(d_model=32, d_ff=64, num_layers=1, num_heads=2, num_kv_heads=1)
    c.data.seq_len, c.train.global_batch_size = 16, 8
    last = trainer.run(c, str(tmp_path))
    program = trainer.setup(c, str(tmp_path)).program
    assert program.programs == {} and program.flops_per_step == program.train_step_flops
    _check_throughput(tmp_path, program, 3)
    assert np.isfinite(last["loss"])
    assert np.isfinite(by_step(tmp_path, "eval_loss")[3]["eval_perplexity"])
    extra = read_json_items(str(tmp_path / "checkpoints"), 3)["extra"]
    assert extra["host_state"] == {}  # the default loop carries nothing between steps


def test_an_rl_stage_runs_on_the_same_trainer_loop(tmp_path, tokenizer):
    c = _common(grpo_config(num_epochs=2), tokenizer, steps=2)
    trainer.run(c, str(tmp_path))
    program = trainer.setup(c, str(tmp_path)).program
    # MFU divides by the update's FLOPs and the rollout's.
    assert program.flops_per_step == pytest.approx(
        program.train_step_flops + program.programs["rollout"].flops, rel=1e-12)
    _check_throughput(tmp_path, program, 2)
    rows = by_step(tmp_path, "reward_mean")
    assert all(row["rollout_tokens_per_sec"] > 0 for row in rows.values())
    # The loop's held-out evaluation (greedy decoding), called by the trainer.
    assert "eval_accuracy" in by_step(tmp_path, "eval_accuracy")[2]
