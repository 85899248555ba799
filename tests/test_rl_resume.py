"""Exact resume of a GRPO run through `python -m jaxlm.main`: a run cut back to its step-2
checkpoint and restarted ends with bitwise the params, rollout rewards and held-out metrics of
the run never stopped (the prompt pipeline's position and the rollout keys are restored)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data_fixtures import train_tiny_tokenizer
from tests.test_stage_resume import _by_step, _cut_back, _state

ROOT = Path(__file__).resolve().parents[1]
STEPS, STOP = 4, 2
TIMING = ("steps_per_sec", "tokens_per_sec", "mfu", "rollout_tokens_per_sec", "rollout_fraction",
          "rollout_seconds")


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
    cmd = [sys.executable, "-m", "jaxlm.main", "--config=configs/grpo_tiny.py",
           f"--workdir={workdir}", *flags]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("grpo_resume")
    tokenizer = train_tiny_tokenizer(str(base / "tok")).path
    _main(base / "full", tokenizer)
    return base, tokenizer


def test_grpo_stopped_and_resumed_equals_uninterrupted(reference):
    base, tokenizer = reference
    full, resumed = base / "full", base / "resumed"
    rows = _by_step(full, "reward_mean")
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert len({r["reward_mean"] for r in rows.values()}) > 1  # the policy really changes
    _cut_back(full, resumed, STOP)
    _main(resumed, tokenizer)
    got = _by_step(resumed, "reward_mean")
    for step in range(1, STEPS + 1):
        for key, value in rows[step].items():
            if key not in TIMING and key not in ("time", "wall_time"):
                assert got[step][key] == value, (step, key, got[step][key], value)
    evals, want = _by_step(resumed, "eval_accuracy"), _by_step(full, "eval_accuracy")
    assert evals[STEPS] == want[STEPS]
    a, b = _state(resumed, STEPS), _state(full, STEPS)
    assert a.keys() == b.keys() and int(a["step"]) == STEPS
    for name, value in b.items():
        np.testing.assert_array_equal(a[name], value, err_msg=name)
    first = _state(full, STOP)
    assert any(not np.array_equal(first[k], b[k]) for k in b if "params" in k)
