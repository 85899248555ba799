"""Exact resume of a GRPO run through `python -m jaxlm.main`: a run cut back to its step-2
checkpoint and restarted ends with bitwise the params, rollout rewards and held-out metrics of
the run never stopped (the prompt pipeline's position and the rollout keys are restored)."""

from pathlib import Path

import numpy as np
import pytest

from tests.cli import run_cli
from tests.data_fixtures import train_tiny_tokenizer
from tests.run_metrics import by_step, cut_back, measured, state

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

STEPS, STOP = 4, 2


def _main(workdir: Path, tokenizer: str) -> None:
    flags = [f"--config.data.tokenizer_path={tokenizer}", "--config.model.d_model=32",
             "--config.model.d_ff=64", "--config.data.seq_len=14", "--config.rl.max_new_tokens=6",
             "--config.rl.group_size=4", "--config.train.global_batch_size=4",
             "--config.rl.max_operand=4", "--config.rl.rewards=format:1,brevity:1",
             # GRPO alone from a random init: no SFT phase, reference or chat prompts.
             "--config.init_from.config=", "--config.rl.kl_coef=0", "--config.rl.chat=False",
             "--config.rl.num_operands=2", "--config.rl.sft_fraction=0",
             "--config.rl.num_epochs=2", "--config.optim.learning_rate=1e-2",
             f"--config.train.steps={STEPS}", f"--config.checkpoint.every_steps={STOP}",
             f"--config.eval.every_steps={STOP}", "--config.eval.examples=4",
             "--config.checkpoint.keep_last=4", "--config.checkpoint.async_save=False",
             "--config.log.every_steps=1", "--config.log.tensorboard=False"]
    run_cli("jaxlm.main", "--config=configs/grpo_tiny.py", f"--workdir={workdir}", *flags,
            devices=2, jax_cache=workdir.parent / "jax_cache", timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("grpo_resume")
    tokenizer = train_tiny_tokenizer(str(base / "tok")).path
    _main(base / "full", tokenizer)
    return base, tokenizer


def test_grpo_stopped_and_resumed_equals_uninterrupted(reference):
    base, tokenizer = reference
    full, resumed = base / "full", base / "resumed"
    rows = by_step(full, "reward_mean")
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert len({r["reward_mean"] for r in rows.values()}) > 1  # the policy really changes
    cut_back(full, resumed, STOP)
    _main(resumed, tokenizer)
    got = by_step(resumed, "reward_mean")
    for step in range(1, STEPS + 1):
        assert measured(got[step]) == measured(rows[step]), step
    evals, want = by_step(resumed, "eval_accuracy"), by_step(full, "eval_accuracy")
    assert measured(evals[STEPS]) == measured(want[STEPS])
    a, b = state(resumed, STEPS), state(full, STEPS)
    assert a.keys() == b.keys() and int(a["step"]) == STEPS
    for name, value in b.items():
        np.testing.assert_array_equal(a[name], value, err_msg=name)
    first = state(full, STOP)
    assert any(not np.array_equal(first[k], b[k]) for k in b if "params" in k)
