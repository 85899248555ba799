"""jaxlm.sweep end to end: a 2-point IsoFLOP sweep trains, tabulates, and skips finished points."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm import config as config_lib
from jaxlm import scaling, sweep

ROOT = Path(__file__).resolve().parents[1]
SPEC = f"{ROOT / 'configs/sweeps/isoflop_tiny.py'}:budgets=2e8,shapes=16x1/32x1,smoke=True"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    from jaxlm import trainer

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


def test_unfinished_point_is_run_again(swept, tmp_path):
    workdir, rows, _ = swept
    assert sweep.summarize(sweep.read_metrics(str(Path(workdir) / rows[0]["name"])),
                           rows[0]["steps"] + 1) is None
    rows_ = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5},
             {"step": 2, "loss": 1.0}]  # a resumed run rewrote step 2: the last row counts
    assert sweep.summarize(rows_, 2) == {"final_loss": 1.0, "final_loss_avg": 1.0,
                                         "eval_loss": 2.5}


def test_print_commands_and_bad_overrides(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxlm.sweep", f"--config={SPEC}",
                          f"--workdir={tmp_path}", "--print_commands"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(out) == 2
    assert out[0].startswith("python -m jaxlm.main --config=")
    assert f"--workdir={tmp_path}/C2e08_d16_l1" in out[0]
    assert "--config.model.d_model=16" in out[0] and "--config.train.tokens=" in out[0]
    module, arg = sweep.load_sweep_file(SPEC)
    with pytest.raises(ValueError, match="config key model.d_modle"):
        sweep.apply_overrides(module.get_config(arg), {"model.d_modle": 3}, "p")
