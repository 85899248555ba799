"""End to end through `python -m jaxlm.main`: pretrain tiny -> SFT -> DPO, each from the
previous run's checkpoint (init_from), with a tiny model so that it runs in seconds."""

import json
import math
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.cli import QUIET_LOG, TINY_MODEL, run_cli

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

RUN = (*TINY_MODEL, *QUIET_LOG, "--config.train.steps=2", "--config.eval.every_steps=2",
       "--config.eval.tokens=256", "--config.eval.examples=8")


def _main(config: str, workdir: Path, *extra: str) -> str:
    return run_cli("jaxlm.main", f"--config={config}", f"--workdir={workdir}", *RUN,
                   *extra).stderr


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("post")
    pre, sft, dpo = base / "pretrain", base / "sft", base / "dpo"
    _main("configs/tiny.py", pre)
    sft_log = _main(f"configs/sft_tiny.py:pretrained={pre}", sft)
    # DPO with LoRA adapters: the step-0 model is still exactly the SFT model.
    dpo_log = _main(f"configs/dpo_tiny.py:sft={sft}", dpo, "--config.dpo.max_prompt_tokens=16",
                    "--config.model.lora.rank=4")
    return pre, sft, dpo, sft_log, dpo_log


def test_sft_starts_from_the_pretrained_run_and_its_tokenizer(runs):
    pre, sft, _, sft_log, _ = runs
    assert "tokenizer of the init_from run" in sft_log and str(pre / "cache") in sft_log
    assert "sft train data" in sft_log and "truncated" in sft_log
    train = [r for r in _rows(sft) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(0 < r["trained_fraction"] < 1 and r["loss"] > 0 for r in train)
    assert any("eval_loss" in r for r in _rows(sft))


def test_dpo_starts_at_log2_from_the_sft_run(runs):
    _, _, dpo, _, dpo_log = runs
    train = [r for r in _rows(dpo) if "loss" in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    for key in ("reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin",
                "chosen_logp", "rejected_logp"):
        assert key in train[0], key
    assert any("eval_reward_accuracy" in r for r in _rows(dpo))
    assert "dpo train data" in dpo_log


def test_lora_dpo_trains_only_adapters_and_merges(runs, tmp_path):
    _, _, dpo, _, dpo_log = runs
    assert "LoRA rank 4" in dpo_log and "params not in" in dpo_log
    # The SFT checkpoint is restored once: it starts the policy and is the frozen reference.
    assert dpo_log.count("params from ") == 1, dpo_log
    from jaxlm.tools.merge_lora import merge_checkpoint

    step = merge_checkpoint(str(dpo / "checkpoints"), str(tmp_path / "merged"))
    config = json.loads((tmp_path / "merged" / str(step) / "config" / "metadata").read_text())
    assert step == 2 and config["model"]["lora"]["rank"] == 0


def _params(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """'/'-named params of checkpoint `step` of a run, on the host."""
    tree = ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))
    return ocp.tree.to_flat_dict(tree["params"], sep="/")


MARGIN = 0.5


@pytest.fixture(scope="module")
def reward_runs(runs, tmp_path_factory):
    """A reward model from the SFT run through `python -m jaxlm.main`: full fine-tuning with a
    margin, and with LoRA adapters (only they and the head train)."""
    pre, sft, *_ = runs
    base = tmp_path_factory.mktemp("reward")
    full, lora_run = base / "full", base / "lora"
    args = ("--config.stage=reward", f"--config.init_from.path={sft / 'checkpoints'}",
            "--config.reward.max_prompt_tokens=16", "--config.optim.learning_rate=1e-2",
            "--config.optim.warmup_steps=1")
    config = f"configs/sft_tiny.py:pretrained={pre}"
    full_log = _main(config, full, *args, f"--config.reward.margin={MARGIN}")
    lora_log = _main(config, lora_run, *args, "--config.model.lora.rank=4")
    return sft, full, lora_run, full_log, lora_log


def test_reward_stage_through_main_starts_at_log2_plus_margin_and_trains_its_head(reward_runs):
    _, full, _, full_log, _ = reward_runs
    train = [r for r in _rows(full) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    # The head starts at zero: r_chosen = r_rejected = 0, loss = -log sigmoid(-m) = log(1 + e^m).
    assert train[0]["loss"] == pytest.approx(math.log1p(math.exp(MARGIN)), abs=1e-5)
    assert train[0]["accuracy"] == 0.0 and train[0]["margin"] == 0.0
    assert all("accuracy" in r and "margin" in r for r in train)
    assert any("eval_accuracy" in r for r in _rows(full))
    assert "reward train data" in full_log and "reward_head" in full_log  # starts fresh, logged
    head = _params(full, 2)["reward_head"]
    assert head.shape == (32,) and np.abs(head).max() > 0


def test_lora_reward_run_trains_adapters_and_head_only(reward_runs):
    sft, _, lora_run, _, lora_log = reward_runs
    assert "LoRA rank 4" in lora_log
    train = [r for r in _rows(lora_run) if "loss" in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    trained, start = _params(lora_run, 2), _params(sft, 2)
    assert np.abs(trained["reward_head"]).max() > 0  # it is in lora.trainable_mask
    assert sum(k.endswith("_lora_b") for k in trained) == 4
    for name, value in start.items():  # frozen base weights
        np.testing.assert_array_equal(trained[name], value, err_msg=name)
