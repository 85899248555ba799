"""Evals during training: eval.tasks on the live params land in metrics.jsonl and TensorBoard,
equal an evaluation of the saved checkpoint, and never recompile the train step."""

import json

import jax
import pytest

from jaxlm.evaluation import builtin, results
from jaxlm.evaluation.engine import Engine
from jaxlm.evaluation.live import LiveEval
from jaxlm.evaluation.target import load_target
from jaxlm.parallel import sharding
from jaxlm.run import trainer
from jaxlm.run.config import base_config, validate
from tests.run_fixtures import tiny_run_config

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds


def _config(tmp):
    c = tiny_run_config(tmp, steps=3, tensorboard=True)
    c.eval.tasks, c.eval.every_steps, c.eval.limit, c.eval.batch_size = "builtin", 2, 4, 8
    return c


def test_evals_during_training_log_results_and_compile_nothing_twice(tmp_path, monkeypatch):
    compiles: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(kw.get("fun_name", ""))
        if event == "/jax/core/compile/backend_compile_duration" else None)
    per_eval: list[list[str]] = []
    live_run = LiveEval.run

    def counted(self, params, step):
        before = len(compiles)
        out = live_run(self, params, step)
        per_eval.append(compiles[before:])
        return out

    monkeypatch.setattr(LiveEval, "run", counted)
    workdir = tmp_path / "run"
    trainer.run(_config(tmp_path), str(workdir))

    assert len(per_eval) == 2  # at step 2 (every_steps=2) and at the last step, 3
    assert per_eval[0] and per_eval[1] == []  # the eval programs compiled once, then reused
    assert sum("pretrain_step" in name for name in compiles) == 1  # the train step, once
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/next_line/acc" in r}
    assert sorted(evals) == [2, 3]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one row per step: the evals merged in
    assert "loss" in evals[3] and "eval_loss" in evals[3]
    for key in ("eval/corpus_bpb/bits_per_byte", "eval/line_completion/exact_match",
                "eval/requests_per_sec"):
        assert key in evals[3]
    assert list((workdir / "tensorboard").iterdir())

    # The live evaluation of the last step equals one of the saved checkpoint.
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "pipeline": 1})
    target = load_target(str(workdir), mesh=mesh)
    engine = Engine(target.model_cfg, target.params, target.tokenizer, mesh, batch_size=8)
    heldout = builtin.HeldOut.of_run(target.config.data, target.config.data.cache_dir)
    saved = results.flat_metrics(results.run_tasks(engine, "builtin", limit=4, progress=False,
                                                   heldout=heldout))
    for key, value in saved.items():
        assert evals[3][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    on_disk = json.loads((workdir / "eval" / "results_step3.json").read_text())
    assert on_disk["checkpoint"]["step"] == 3 and on_disk["config"]["eval"]["tasks"] == "builtin"


def test_eval_config_is_validated():
    c = base_config()
    c.eval.every_steps = -1
    with pytest.raises(ValueError, match="config key eval.every_steps"):
        validate(c)
    c = base_config()
    c.eval.batch_size = 0
    with pytest.raises(ValueError, match="config key eval.batch_size"):
        validate(c)
