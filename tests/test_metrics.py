"""metrics.jsonl: stable fields, one row per step (later metrics of a step merged into it),
appends locally, rewrites whole objects on object stores."""

import json

import pytest

from jaxlm.run.metrics import MetricsWriter, format_duration, is_remote


@pytest.mark.parametrize("append", [True, False])
def test_rows_accumulate_across_writers(tmp_path, append):
    for start in (1, 3):  # a resumed run opens the file again and keeps the earlier rows
        writer = MetricsWriter(str(tmp_path), tensorboard=False, append=append)
        writer.write(start, {"loss": 2.5, "lr": 1e-3})
        writer.write(start + 1, {"loss": 2.0, "lr": 1e-3})
        writer.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1] == {"step": 2, "loss": 2.0, "lr": 1e-3}


@pytest.mark.parametrize("append", [True, False])
def test_metrics_of_the_same_step_merge_into_one_row(tmp_path, append):
    writer = MetricsWriter(str(tmp_path), tensorboard=False, append=append)
    writer.write(1, {"loss": 3.0})
    writer.write(2, {"loss": 2.5, "lr": 1e-3})
    writer.write(2, {"eval_loss": 2.75, "eval_accuracy": float("nan")})  # after the step's row
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1] == {"step": 2, "loss": 2.5, "lr": 1e-3, "eval_loss": 2.75,
                        "eval_accuracy": None, "eval_accuracy_nonfinite": "nan"}
    writer.write(2, {"eval/next_line/acc": 0.5})  # a third writer of the step (live evals)
    writer.write(3, {"eval_loss": 2.5})  # a step with an eval and no logged training metrics
    writer.write(4, {"loss": 2.0})
    writer.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["eval/next_line/acc"] == 0.5 and rows[1]["loss"] == 2.5
    assert rows[2] == {"step": 3, "eval_loss": 2.5} and rows[3] == {"step": 4, "loss": 2.0}


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "w"), enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "w").exists()


def test_helpers():
    assert is_remote("gs://bucket/run") and not is_remote("/tmp/run")
    assert format_duration(3725) == "1h02m05s" and format_duration(65) == "1m05s"
