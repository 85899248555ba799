"""Exact resume through `python -m jaxlm.main`: a run killed (SIGKILL) or preempted (SIGTERM)
and restarted with the same command logs, for every step, bitwise the loss of a run that was
never interrupted."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli import cli_command, cli_env

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def _command(workdir: Path, cache: Path) -> list[str]:
    return cli_command(
        "jaxlm.main", "--config=configs/tiny.py", f"--workdir={workdir}",
        f"--config.train.steps={STEPS}", "--config.model.num_layers=2", "--config.model.d_model=64",
            "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
            "--config.model.d_ff=128", "--config.data.seq_len=32",
            "--config.train.global_batch_size=4", "--config.data.vocab_size=512",
            "--config.data.max_documents=200", f"--config.data.cache_dir={cache}",
            "--config.log.every_steps=1", "--config.eval.every_steps=0",
            "--config.log.sample_every=0", "--config.checkpoint.every_steps=4",
            "--config.optim.warmup_steps=2", "--config.log.tensorboard=False")


def _env() -> dict[str, str]:
    return cli_env()


def _losses(workdir: Path) -> dict[int, float]:
    """step -> loss, the last row of each step winning (a resumed run re-logs replayed steps)."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _start_and_signal_at(cmd: list[str], workdir: Path, step: int, sig: int) -> int:
    """Starts `cmd`, sends `sig` once metrics.jsonl shows `step`, returns the exit code."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = workdir / "metrics.jsonl"
            if metrics.exists() and step in _losses(workdir):
                proc.send_signal(sig)
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert step in _losses(workdir), err[-4000:]
    return proc.returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    cache = base / "cache"
    workdir = base / "uninterrupted"
    _run(_command(workdir, cache))
    return cache, _losses(workdir)


def test_sigkill_then_same_command_resumes_bitwise(uninterrupted, tmp_path):
    cache, reference = uninterrupted
    assert sorted(reference) == list(range(1, STEPS + 1))
    workdir = tmp_path / "killed"
    cmd = _command(workdir, cache)
    code = _start_and_signal_at(cmd, workdir, 6, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert max(_losses(workdir)) < STEPS  # really killed mid-run
    _run(cmd)
    resumed = _losses(workdir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])


def test_sigterm_saves_and_exits_zero_then_resumes_bitwise(uninterrupted, tmp_path):
    cache, reference = uninterrupted
    workdir = tmp_path / "preempted"
    cmd = _command(workdir, cache)
    code = _start_and_signal_at(cmd, workdir, 5, signal.SIGTERM)
    assert code == 0
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    stopped_at = max(_losses(workdir))
    assert saved[-1] == stopped_at < STEPS  # the preempted step itself was saved
    _run(cmd)
    resumed = _losses(workdir)
    for step in range(stopped_at + 1, STEPS + 1):
        assert resumed[step] == reference[step], step
