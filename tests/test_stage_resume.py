"""Exact resume of the post-training stages through `python -m jaxlm.main`: an SFT run and a
DPO run stopped after K steps and restarted with the same command in the same workdir end with
bitwise the params, and log bitwise the losses and eval metrics, of runs never stopped.

A run "stopped after K steps" is the uninterrupted run's workdir cut back to its step-K
checkpoint (the newer checkpoints deleted, the metrics of later steps removed): exactly what a
run killed after its step-K save leaves behind (tests/test_resume.py kills a real pretraining
run with signals). The restart must restore the data iterator position: SFT packs several
conversations per row (grain's first-fit packer), DPO batches preference pairs.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from jaxlm.data import conversations
from tests.cli import QUIET_LOG, TINY_MODEL, run_cli
from tests.run_metrics import by_step, cut_back, measured, state

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

STEPS, STOP = 6, 3
DATA = 120  # dialogs / pairs
# Checkpoints at STOP and STEPS, both kept; evals at the same steps.
RESUMABLE = [f"--config.train.steps={STEPS}", f"--config.checkpoint.every_steps={STOP}",
             f"--config.eval.every_steps={STOP}", "--config.eval.tokens=256",
             "--config.eval.examples=8",
             "--config.checkpoint.keep_last=4", "--config.optim.warmup_steps=2"]


def _main(config: str, workdir: Path, *extra: str) -> None:
    # A compilation cache shared by the runs of this module: a restart compiles nothing anew.
    run_cli("jaxlm.main", f"--config={config}", f"--workdir={workdir}", *TINY_MODEL, *QUIET_LOG,
            *extra, jax_cache=workdir.parent / "jax_cache")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _assert_same_run(resumed: Path, reference: Path) -> None:
    assert sorted(int(p.name) for p in (resumed / "checkpoints").iterdir()
                  if p.name.isdigit()) == [STOP, STEPS]
    train, want = by_step(resumed, "loss"), by_step(reference, "loss")
    assert sorted(train) == sorted(want) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert measured(train[step]) == measured(want[step]), step
    evals, want_evals = by_step(resumed, "eval_loss"), by_step(reference, "eval_loss")
    assert sorted(evals) == [STOP, STEPS]
    assert measured(evals[STEPS]) == measured(want_evals[STEPS])
    got, expected = state(resumed, STEPS), state(reference, STEPS)
    assert got.keys() == expected.keys() and int(got["step"]) == STEPS
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted SFT -> uninterrupted DPO (LoRA with dropout) and the command line of each."""
    base = tmp_path_factory.mktemp("stage_resume")
    sft, dpo = base / "sft", base / "dpo"
    # The first dialogs and pairs of the chatterbot sets, as jsonl (quicker to tokenise).
    _write_jsonl(base / "dialogs.jsonl", [{"messages": m} for m in
                                          conversations.chatterbot_conversations()[:DATA]])
    _write_jsonl(base / "pairs.jsonl", [dataclasses.asdict(p) for p in
                                        conversations.chatterbot_pairs(0)[:DATA]])
    # SFT from a fresh init (no pretraining run: it would only cost time here).
    sft_cmd = ("configs/sft_tiny.py", *RESUMABLE, "--config.init_from.path=",
               f"--config.sft.paths={base / 'dialogs.jsonl'}")
    _main(sft_cmd[0], sft, *sft_cmd[1:])
    dpo_cmd = (f"configs/dpo_tiny.py:sft={sft}", *RESUMABLE, "--config.dpo.max_prompt_tokens=16",
               f"--config.dpo.paths={base / 'pairs.jsonl'}",
               "--config.model.lora.rank=4",
               "--config.model.lora.dropout=0.1", "--config.optim.learning_rate=1e-2")
    _main(dpo_cmd[0], dpo, *dpo_cmd[1:])
    return base, {"sft": (sft, sft_cmd), "dpo": (dpo, dpo_cmd)}


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_stage_stopped_and_resumed_equals_uninterrupted(runs, stage):
    base, by_stage = runs
    reference, cmd = by_stage[stage]
    # The run really learns something, so equal params are not equal by accident.
    losses = [r["loss"] for r in by_step(reference, "loss").values()]
    assert len(set(losses)) >= STEPS - 1  # DPO: steps 1 and 2 (lr 0) are at log 2
    resumed = base / f"{stage}_resumed"
    cut_back(reference, resumed, STOP)
    assert max(by_step(resumed, "loss")) == STOP
    _main(cmd[0], resumed, *cmd[1:])
    _assert_same_run(resumed, reference)
