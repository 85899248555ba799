"""Multi-host on JAX's own distributed runtime, end to end through launch/local.sh and
`python -m jaxlm.main`: 2 processes x 4 CPU devices (gloo over loopback) train to the same
losses as 1 process x 8 devices, and a checkpoint written by either layout resumes on the other.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli import xla_flags

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _args(workdir: Path, cache: Path) -> list[str]:
    return ["--config=configs/tiny.py", f"--workdir={workdir}", f"--config.train.steps={STEPS}",
            "--config.model.num_layers=2", "--config.model.d_model=64",
            "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
            "--config.model.d_ff=128", "--config.data.seq_len=32",
            "--config.train.global_batch_size=8", "--config.data.vocab_size=512",
            "--config.data.max_documents=200", f"--config.data.cache_dir={cache}",
            "--config.data.process_sharding=rows", "--config.mesh.data=2",
            "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            "--config.log.every_steps=1", "--config.eval.every_steps=0",
            "--config.log.sample_every=0", "--config.checkpoint.every_steps=3",
            "--config.optim.warmup_steps=2", "--config.log.tensorboard=False",
            "--config.log.peak_flops=1e11"]


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # local.sh stops its own children on SIGTERM
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"timed out:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]


def _jit_cache(cache: Path) -> dict[str, str]:
    """A persistent compilation cache of every program, shared by the module's runs: a
    resumed run compiles nothing its layout's first run compiled."""
    return {"JAX_COMPILATION_CACHE_DIR": str(cache / "jit"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _one_process(workdir: Path, cache: Path) -> None:
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu", JAXLM_DISTRIBUTED="off", **_jit_cache(cache))
    _run([sys.executable, "-m", "jaxlm.main", *_args(workdir, cache)], env)


def _two_processes(workdir: Path, cache: Path) -> None:
    env = dict(os.environ, DEVICES_PER_PROCESS="4", PYTHON=sys.executable, **_jit_cache(cache))
    _run(["bash", "launch/local.sh", "2", *_args(workdir, cache)], env)


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _resume_copy(src: Path, dst: Path, step: int) -> None:
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / str(step), dst / "checkpoints" / str(step))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    cache = base / "cache"
    _one_process(base / "one", cache)
    _two_processes(base / "two", cache)
    return base, cache


def test_two_processes_train_like_one(runs):
    base, _ = runs
    one, two = _losses(base / "one"), _losses(base / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                               rtol=2e-5)
    # only process 0 writes metrics: one training row per step (plus the final eval row)
    lines = (base / "two" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in line for line in lines) == STEPS


def _resumes_equal_the_uninterrupted_run(base, cache, source, target, run_fn):
    """The checkpoint of `source` at step 3, resumed by `run_fn` in `target`, continues the
    one-process run's losses (steps 4-6)."""
    _resume_copy(base / source, base / target, 3)
    run_fn(base / target, cache)
    resumed, reference = _losses(base / target), _losses(base / "one")
    assert sorted(resumed) == [4, 5, 6]
    np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)],
                               [reference[s] for s in (4, 5, 6)], rtol=2e-5)


def test_checkpoint_of_two_processes_resumes_on_one(runs):
    _resumes_equal_the_uninterrupted_run(*runs, "two", "two_to_one", _one_process)


def test_checkpoint_of_one_process_resumes_on_two(runs):
    _resumes_equal_the_uninterrupted_run(*runs, "one", "one_to_two", _two_processes)
