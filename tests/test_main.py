"""End to end: the README's quickstart command, run as written (plus a step-count override)."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import cli_env, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _readme_main_command() -> list[str]:
    """The `python -m jaxlm.main ...` part of the README's first quickstart line."""
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    line = first_block.strip().splitlines()[0]
    main_cmd = line.split("&&", 1)[1].strip()
    assert main_cmd.startswith("python -m jaxlm.main"), line
    return shlex.split(main_cmd)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    cmd = _readme_main_command()
    workdir = tmp_path_factory.mktemp("quickstart")
    cmd = [a if not a.startswith("--workdir=") else f"--workdir={workdir}" for a in cmd]
    cmd[0] = sys.executable
    cmd += ["--config.train.steps=2", "--config.log.every_steps=1",
            "--config.eval.every_steps=2", "--config.eval.tokens=2048",
            "--config.log.sample_every=2", "--config.log.sample_tokens=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, proc.stderr


@pytest.mark.slow
def test_quickstart_writes_metrics_jsonl(quickstart_run):
    workdir, _ = quickstart_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
            assert key in row, key
        assert row["loss"] > 0 and row["tokens_per_sec"] > 0 and 0 < row["mfu"] < 1
    assert [r["step"] for r in rows] == [1, 2]  # one row per step, evaluation merged in
    assert "eval_loss" in rows[-1]


@pytest.mark.slow
def test_quickstart_writes_tensorboard_events_and_logs_progress(quickstart_run):
    workdir, log = quickstart_run
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert re.search(r"step 2/2 \| loss [\d.]+ .* tok/s \| mfu [\d.]+% \| eta", log)
    assert "sample at step 2" in log
    assert "measured" in log  # the CPU peak FLOP/s is measured, and the log says so


def test_bad_override_fails_before_compiling_and_names_the_key(tmp_path):
    proc = run_cli("jaxlm.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                   "--config.model.num_heads=5", check=False)
    assert proc.returncode != 0
    assert "config key model.num_heads" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
