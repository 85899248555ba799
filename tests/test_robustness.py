"""No silent wrong runs: one owner per workdir, non-finite values caught, unreadable
checkpoints moved aside, metrics.jsonl with each step once and in strict JSON, bad data named."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.run import errors, trainer, workdir_lock
from jaxlm.run.config import base_config, validate
from jaxlm.run.metrics import MetricsWriter
from jaxlm.run.step_health import StepHealth
from jaxlm.run.train_state import TrainState
from tests.cli import run_cli

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

ROOT = Path(__file__).resolve().parents[1]


def _config(cache: Path, steps: int):
    c = base_config()
    c.model.num_layers, c.model.d_model, c.model.d_ff = 1, 32, 64
    c.data.seq_len, c.data.vocab_size, c.data.max_documents = 16, 400, 60
    c.data.cache_dir = str(cache)
    c.train.global_batch_size, c.train.steps, c.eval.every_steps = 8, steps, 0
    c.optim.warmup_steps = 1
    c.log.sample_every, c.log.tensorboard, c.log.every_steps = 0, False, 1
    c.checkpoint.every_steps, c.checkpoint.keep_last = 2, 5
    c.checkpoint.async_save = False
    return c


def _strict_rows(workdir: Path) -> list[dict]:
    def reject(token: str):
        raise AssertionError(f"metrics.jsonl holds a bare {token}")
    return [json.loads(line, parse_constant=reject)
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# --- one owner per workdir ---------------------------------------------------------------------

def test_second_run_on_a_locked_workdir_refuses_naming_the_owner(tmp_path):
    owner = workdir_lock.WorkdirLock(str(tmp_path / "run"))
    owner.acquire()
    try:
        with pytest.raises(errors.WorkdirLockedError,
                           match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
            trainer.run(_config(tmp_path / "cache", steps=1), str(tmp_path / "run"))
    finally:
        owner.release()
    assert not (tmp_path / "run" / "LOCK").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # the refused run wrote nothing


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                               "started": 1.0, "heartbeat": 1.0}))
    with workdir_lock.hold(str(tmp_path)) as lock:
        held = json.loads((tmp_path / "LOCK").read_text())
        assert held["pid"] == os.getpid() and held["token"] == lock.owner["token"]
    assert not (tmp_path / "LOCK").exists()


def test_lock_of_another_host_is_stale_only_without_heartbeat():
    now = 1e9
    alive = {"host": "elsewhere", "pid": 1, "started": now - 5000, "heartbeat": now - 10}
    assert workdir_lock.stale_reason(alive, now) is None
    gone = dict(alive, heartbeat=now - workdir_lock.STALE_AFTER_S - 1)
    assert "heartbeat" in workdir_lock.stale_reason(gone, now)


# --- non-finite values -------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("optim.learning_rate", float("nan")),
                                       ("optim.weight_decay", float("inf")),
                                       ("optim.min_lr_ratio", float("nan"))])
def test_nan_or_inf_float_keys_are_rejected(tmp_path, key, value):
    c = _config(tmp_path, steps=1)
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(errors.ConfigError, match=rf"config key {key}: must be a finite"):
        validate(c)


def test_non_finite_update_is_skipped_and_finite_one_applied():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, 0.5, -1.0])}
    bad = TrainState.create(params, optax.sgd(lambda step: jnp.nan))
    after = bad.apply_gradients(grads, optax.sgd(lambda step: jnp.nan))
    np.testing.assert_array_equal(after.params["w"], params["w"])  # kept, not NaN
    assert int(after.step) == 1 and int(after.nonfinite) == 1
    good_tx = optax.sgd(0.1)
    good = TrainState.create(params, good_tx).apply_gradients(grads, good_tx)
    np.testing.assert_allclose(good.params["w"], params["w"] - 0.1 * grads["w"], rtol=1e-6)
    assert int(good.nonfinite) == 0


def test_step_health_stops_after_max_nonfinite_and_reports_a_stuck_gradient(caplog):
    health = StepHealth(max_nonfinite=2)
    health.check({"nonfinite": 1, "grad_norm": 1.0}, step=1)
    with pytest.raises(FloatingPointError, match="train.max_nonfinite=2"):
        health.check({"nonfinite": 2, "grad_norm": 1.0}, step=2)
    health = StepHealth(max_nonfinite=5)
    with caplog.at_level("WARNING"):
        for step in range(1, 6):  # each step checked twice (as at a save): counted once
            health.check({"nonfinite": 0, "grad_norm": 0.0}, step=step)
            health.check({"nonfinite": 0, "grad_norm": 0.0}, step=step)
    stuck = [r for r in caplog.records if "exactly 0" in r.getMessage()]
    assert len(stuck) == 1 and "step 3" in stuck[0].getMessage()


# --- metrics.jsonl -----------------------------------------------------------------------------

def test_metrics_are_strict_json_and_truncate_after_a_step(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        w.write(step, {"loss": float("nan") if step == 2 else 1.0 / step})
    assert w.truncate_after(2) == 1
    w.write(3, {"loss": 0.25})
    w.close()
    rows = _strict_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] is None and rows[1]["loss_nonfinite"] == "nan"
    assert rows[2]["loss"] == 0.25


# --- resume that recovers ----------------------------------------------------------------------

def test_unreadable_newest_checkpoints_are_moved_aside_and_run_resumes(tmp_path, caplog):
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    c = _config(cache, steps=5)
    c.checkpoint.every_steps = 1
    trainer.run(c, str(workdir))  # checkpoints 1..5
    first = {r["step"]: r for r in _strict_rows(workdir) if "loss" in r}
    ckpts = workdir / "checkpoints"
    # Step 5: its array data files truncated. Step 4: _METADATA gone (a save cut short).
    # Step 3: the data iterator position gone.
    broken = [p for p in (ckpts / "5" / "state").rglob("*") if p.is_file()
              and p.stat().st_size > 0 and "d" in p.parent.name]
    assert broken
    for p in broken:
        p.write_bytes(p.read_bytes()[:7])
    (ckpts / "4" / "state" / "_METADATA").unlink()
    for p in (ckpts / "3" / "data").iterdir():
        p.unlink()

    with caplog.at_level("WARNING"):
        last = trainer.run(c, str(workdir))
    why = {int(m.split()[2]): m for m in (r.getMessage() for r in caplog.records)
           if m.startswith("checkpoint step")}
    assert "no readable _METADATA" in why[4] and "position file is missing" in why[3]
    assert "saved by" not in why[3] and "has no train state" not in why[4]
    aside = sorted(p.name.split("-")[0] for p in (workdir / "checkpoints.unreadable").iterdir())
    assert aside == ["3", "4", "5"]  # moved, not deleted
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [1, 2, 3, 4, 5]
    rows = [r for r in _strict_rows(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # each step once
    # Resumed from step 2: steps 3-5 replay the same batches from the same state.
    for step in (3, 4, 5):
        assert rows[step - 1]["loss"] == first[step]["loss"]
    assert last["tokens_seen"] == 5 * 8 * 16


def test_changed_batch_size_keeps_counting_tokens_seen(tmp_path, caplog):
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    trainer.run(_config(cache, steps=2), str(workdir))
    c = _config(cache, steps=3)
    c.train.global_batch_size = 16
    with caplog.at_level("WARNING"):
        last = trainer.run(c, str(workdir))
    assert last["tokens_seen"] == 2 * 8 * 16 + 16 * 16  # never goes backwards
    assert any("train.global_batch_size 8 -> 16" in r.getMessage() for r in caplog.records)


# --- one clear line ----------------------------------------------------------------------------

def _main(*flags: str) -> subprocess.CompletedProcess:
    return run_cli("jaxlm.main", *flags, devices=None, check=False, timeout=300)


def test_unknown_key_and_missing_config_file_print_one_line(tmp_path):
    proc = _main("--config=configs/tiny.py", f"--workdir={tmp_path}",
                 "--config.train.stepz=3")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: config key train.stepz: unknown key (did you mean train.steps?)"]
    proc = _main("--config=configs/nosuch.py", f"--workdir={tmp_path}")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "configs/nosuch.py" in proc.stderr
    proc = _main("--config=configs/tiny.py", f"--workdir={tmp_path}",
                 "--config.train.stepz=3", "--verbosity=1")
    assert "Traceback" in proc.stderr



def test_console_shows_own_info_and_warnings_and_the_file_gets_everything(tmp_path):
    import logging

    from jaxlm.run import console

    def record(path: str, level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord("absl", level, path, 1, msg, None, None)

    own = str(Path(console.__file__).with_name("checkpoint.py"))
    lib = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    flt = console.OwnInfoOnly()
    assert flt.filter(record(own, logging.INFO, "checkpoint: step 5"))
    data_layer = str(Path(console.__file__).parents[1] / "data" / "eval_sample.py")
    assert flt.filter(record(data_layer, logging.INFO, "eval sample: 72 documents"))
    assert not flt.filter(record(lib, logging.INFO, "Saving item state"))
    assert flt.filter(record(lib, logging.WARNING, "disk nearly full"))
    # A traceback orbax logs for a failure jaxlm re-raises in one line stays off the console.
    failed = record(lib, logging.ERROR, "_SignalingThread.run() raised an exception")
    failed.exc_info = (OSError, OSError(28, "No space left on device"), None)
    assert not flt.filter(failed) and not console.NoReraisedTracebacks().filter(failed)
    assert console.NoReraisedTracebacks().filter(record(lib, logging.ERROR, "no traceback"))
    assert not flt.filter(record(lib, logging.WARNING, "Given directory is read only=/x"))
    with console.quiet(str(tmp_path)):
        logging.getLogger("orbax.test").warning("library line %d", 7)
    assert "library line 7" in (tmp_path / console.LOG_FILE).read_text()


def test_corrupt_safetensors_file_is_named(tmp_path):
    from jaxlm.weights.hf.safetensors_io import iter_tensors

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # header cut short
    with pytest.raises(errors.DataError, match=rf"{path}: not a readable safetensors file"):
        list(iter_tensors([str(path)]))


def test_memory_and_network_errors_never_move_a_checkpoint_aside():
    from jaxlm.run.checkpoint import _transient

    assert _transient(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
    assert _transient(ConnectionError("reset by peer")) and _transient(TimeoutError())
    assert not _transient(ValueError("OUT_OF_RANGE: Error reading byte range of local file"))
