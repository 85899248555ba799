"""jaxlm.tools.sweep end to end: a 2-point IsoFLOP sweep trains, tabulates, and skips finished
points."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxlm.run import config as config_lib
from jaxlm.scaling import flops as scaling
from jaxlm.tools import sweep

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

ROOT = Path(__file__).resolve().parents[1]
SPEC = f"{ROOT / 'configs/sweeps/isoflop_tiny.py'}:budgets=2e8,shapes=16x1/32x1,smoke=True"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    from jaxlm.run import trainer

    workdir = str(tmp_path_factory.mktemp("sweep"))
    trained = []

    def train(config, point_dir):
        trained.append(point_dir)
        return trainer.run(config, point_dir)

    rows = sweep.run_sweep(SPEC, workdir, train_fn=train)
    return workdir, rows, trained


def test_isoflop_points_have_budget_sized_token_counts():
    module, arg = sweep.load_sweep_file(SPEC)
    base = module.get_config(arg)
    pts = sweep.points(module, arg)
    assert [name for name, _, _ in pts] == ["C2e08_d16_l1", "C2e08_d32_l1"]
    for name, overrides, meta in pts:
        c = sweep.apply_overrides(base, overrides, name)
        n = scaling.count_params(config_lib.model_config(c, c.data.vocab_size))["total"]
        assert meta == {"budget": 2e8}
        assert overrides["train.tokens"] == int(2e8 / (6 * n))
        numbers = sweep.sizes(c)
        assert numbers["N"] == n
        assert numbers["steps"] == math.ceil(overrides["train.tokens"] / (8 * 16))
        assert numbers["D"] == numbers["steps"] * 8 * 16
        assert numbers["C"] == 6 * n * numbers["D"]
        assert numbers["param_convention"] == "total" and numbers["N_total"] == n
        # The results follow the convention the config names.
        c.train.param_convention = "chinchilla"
        paper = scaling.count_params(config_lib.model_config(c, c.data.vocab_size))["chinchilla"]
        renamed = sweep.sizes(c)
        assert renamed["N"] == paper != n and renamed["N_total"] == n
        assert renamed["C"] == 6 * paper * renamed["D"]


@pytest.mark.slow
def test_sweep_runs_every_point_and_writes_the_results_table(swept):
    workdir, rows, trained = swept
    assert len(trained) == 2
    with open(Path(workdir) / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == ["C2e08_d16_l1", "C2e08_d32_l1"]
    for row, returned in zip(table, rows):
        assert float(row["budget"]) == 2e8
        assert int(row["N"]) == returned["N"] and int(row["D"]) == returned["D"]
        # The table's losses are the trainer's metrics.jsonl at the last step.
        metrics = sweep.read_metrics(str(Path(workdir) / row["name"]))
        last = [m for m in metrics if m["step"] == int(row["steps"])]
        assert float(row["final_loss"]) == next(m["loss"] for m in last if "loss" in m)
        assert float(row["eval_loss"]) == next(m["eval_loss"] for m in last if "eval_loss" in m)
        # Better than uniform over the 400-piece vocabulary after a few steps.
        assert float(row["final_loss"]) < math.log(400)
        assert 0.8 < float(row["C"]) / 2e8 < 1.5


def test_rerun_skips_finished_points(swept):
    workdir, rows, _ = swept
    again = []
    rerun = sweep.run_sweep(SPEC, workdir, train_fn=lambda c, d: again.append(d))
    assert again == [] and rerun == rows


def test_only_unfinished_points_run_and_the_last_row_of_a_step_counts(tmp_path):
    """With a stand-in trainer: a point whose metrics.jsonl stops short of its last step runs
    again; a finished one does not."""
    module, arg = sweep.load_sweep_file(SPEC)
    (name0, over0, _), (name1, over1, _) = sweep.points(module, arg)
    steps0 = sweep.sizes(sweep.apply_overrides(module.get_config(arg), over0, name0))["steps"]
    steps1 = sweep.sizes(sweep.apply_overrides(module.get_config(arg), over1, name1))["steps"]
    (tmp_path / name0).mkdir(parents=True)
    (tmp_path / name1).mkdir()
    # Point 0 was preempted half way; point 1 finished, then its last step was rewritten by a
    # resumed run (the later row counts).
    (tmp_path / name0 / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    rows1 = [{"step": steps1, "loss": 3.0}, {"step": steps1, "eval_loss": 2.5},
             {"step": steps1, "loss": 2.0}]
    (tmp_path / name1 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                            for r in rows1))
    ran = []

    def fake_train(config, point_dir):
        ran.append(Path(point_dir).name)
        with open(Path(point_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": config.train.steps or steps0, "loss": 4.0}) + "\n")

    rows = sweep.run_sweep(SPEC, str(tmp_path), train_fn=fake_train)
    assert ran == [name0]
    assert (rows[0]["final_loss"], rows[1]["final_loss"], rows[1]["eval_loss"]) == (4.0, 2.0,
                                                                                   2.5)
    assert np.isnan(rows[0]["eval_loss"])


def test_print_commands_and_bad_overrides(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxlm.tools.sweep", f"--config={SPEC}",
                          f"--workdir={tmp_path}", "--print_commands"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(out) == 2
    assert out[0].startswith("python -m jaxlm.main --config=")
    assert f"--workdir={tmp_path}/C2e08_d16_l1" in out[0]
    assert "--config.model.d_model=16" in out[0] and "--config.train.tokens=" in out[0]
    module, arg = sweep.load_sweep_file(SPEC)
    with pytest.raises(ValueError, match="config key model.d_modle"):
        sweep.apply_overrides(module.get_config(arg), {"model.d_modle": 3}, "p")
