"""No command destroys a run: a resume that cannot continue refuses in one line instead of
starting over, a failed save keeps the checkpoint before it, and each mistake on the training
side ends in one `error:` line (exit 1) or a logged recovery, with nothing of any run moved,
deleted or overwritten.

Most cases run `python -m jaxlm.main` on a copy of one tiny pretraining run (checkpoints at
steps 2 and 4) trained once per module."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from jaxlm.run import checkpoint, errors, trainer, workdir_lock
from jaxlm.run.config import base_config, validate
from tests.cli import QUIET_LOG, ROOT, TINY_MODEL, cli_command, cli_env, run_cli

STEPS = 4


def _flags(workdir: Path, cache: Path, *extra: str) -> tuple[str, ...]:
    return ("--config=configs/tiny.py", f"--workdir={workdir}", *TINY_MODEL, *QUIET_LOG,
            f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=2",
            "--config.checkpoint.keep_last=5", "--config.eval.every_steps=0",
            "--config.eval.tokens=2048", "--config.optim.warmup_steps=1",
            f"--config.data.cache_dir={cache}", *extra)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4), its cache, and a shared compile cache."""
    base = tmp_path_factory.mktemp("mistakes")
    env = {"base": base, "cache": base / "cache", "jax": base / "jax_cache",
           "run": base / "run"}
    run_cli("jaxlm.main", *_flags(env["run"], env["cache"]), jax_cache=env["jax"])
    return env


def _main(env: dict, workdir: Path, *extra: str, module: str = "jaxlm.main",
          environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli(module, *_flags(workdir, env["cache"], *extra), check=False,
                   env=cli_env(1, env["jax"], **(environ or {})))


def _copy_run(env: dict, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(env["run"], workdir, ignore=shutil.ignore_patterns("LOCK"))
    return workdir


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The `error:` line of a run that failed with exit 1: the only one, the last line, with
    no traceback and no library error record before it."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not [line for line in lines if re.match(r"E\d{4} ", line)], proc.stderr[-3000:]
    errors_ = [line for line in lines if line.startswith("error:")]
    assert errors_ == [lines[-1]], lines[-5:]
    return errors_[0]


def _snapshot(workdir: Path) -> dict[str, bytes]:
    """Every file of the run's checkpoints and metrics, by path."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file() and (p.name == "metrics.jsonl" or "checkpoints" in p.parts)}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_arrays(step_dir: Path) -> None:
    for p in (step_dir / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(p.read_bytes()[:7])


# --- a resume that does not fit refuses; nothing moves -----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("flag,key,change", [
    ("--config.data.num_workers=1", "data.num_workers", "0 -> 1"),
    ("--config.data.shuffle_rows=0", "data.shuffle_rows", "1024 -> 0")])
def test_changed_data_pipeline_key_is_one_line_naming_it(env, tmp_path, flag, key, change):
    workdir = _copy_run(env, tmp_path)
    before = _snapshot(workdir)
    proc = _main(env, workdir, flag, "--config.train.steps=6")
    line = _one_error_line(proc)
    assert line.startswith(f"error: config key {key}: changed since checkpoint step 4 in "
                           f"{workdir / 'checkpoints'} was saved ({change})"), line
    assert "does not fit the new data pipeline" in line
    assert _snapshot(workdir) == before  # no checkpoint moved aside, no metrics row dropped
    assert not (workdir / "checkpoints.unreadable").exists()
    assert not (workdir / "LOCK").exists()


@pytest.mark.slow
def test_another_stage_on_a_pretrain_workdir_is_one_line_naming_the_stage(env, tmp_path):
    workdir = _copy_run(env, tmp_path)
    chats = tmp_path / "chat.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": f"answer {i}"}]}) + "\n" for i in range(40)))
    before = _snapshot(workdir)
    proc = _main(env, workdir, "--config.stage=sft", f"--config.sft.paths={chats}",
                 "--config.train.steps=6")
    line = _one_error_line(proc)
    assert line.startswith("error: config key stage: changed since checkpoint step 4"), line
    assert "'pretrain' -> 'sft'" in line
    assert _snapshot(workdir) == before


# --- every checkpoint unreadable: a loud start over that keeps the old rows --------------------

@pytest.mark.slow
def test_all_checkpoints_unreadable_start_over_loudly_keeping_metrics(env, tmp_path):
    workdir = _copy_run(env, tmp_path)
    old_rows = _rows(workdir / "metrics.jsonl")
    ckpts = workdir / "checkpoints"
    # Step 4: its data position is not JSON. Step 2: its arrays are cut short.
    for p in (ckpts / "4" / "data").iterdir():
        p.write_text("{not json")
    _truncate_arrays(ckpts / "2")
    proc = _main(env, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Event loop is closed" not in proc.stderr and "Traceback" not in proc.stderr
    moved = [line for line in proc.stderr.splitlines() if "] checkpoint step" in line]
    assert len(moved) == 2 and "not valid JSON" in moved[0] and "trying step 2" in moved[0]
    assert moved[1].endswith("no older checkpoint is left: the run starts over from step 0")
    assert proc.stderr.count("starts over from step 0") == 1
    aside = sorted(p.name.split("-")[0] for p in (workdir / "checkpoints.unreadable").iterdir())
    assert aside == ["2", "4"]  # moved, not deleted
    kept = list(workdir.glob("metrics.before-restart-*.jsonl"))
    assert len(kept) == 1 and _rows(kept[0]) == old_rows
    assert f"are kept in {kept[0].name}" in proc.stderr
    new_rows = [r for r in _rows(workdir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in new_rows] == list(range(1, STEPS + 1))


# --- a failed save: one line, the checkpoint before it kept ------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("async_save,item", [("True", "config"), ("False", "data")])
def test_disk_full_mid_save_is_one_line_and_keeps_the_previous_checkpoint(
        env, tmp_path, async_save, item):
    workdir = tmp_path / "run"
    # keep_last=1: a save that counted as done would delete step 2.
    proc = _main(env, workdir, f"--config.checkpoint.async_save={async_save}",
                 "--config.checkpoint.keep_last=1", module="tests.disk_full_main",
                 environ={"FULL_AT_STEP": "4", "FULL_AT_ITEM": item})
    line = _one_error_line(proc)
    assert line.startswith(f"error: checkpoint step 4 could not be written to "
                           f"{workdir / 'checkpoints'} (OSError: [Errno 28] No space left"), line
    assert line.endswith("the newest complete checkpoint is still step 2, and a rerun resumes "
                         "from it")
    for text in (proc.stderr, (workdir / "log.txt").read_text()):
        assert "checkpoint: step 2 ->" in text and "checkpoint: step 4 ->" not in text
    assert checkpoint.complete_steps(str(workdir / "checkpoints")) == [2]
    assert not (workdir / "LOCK").exists()
    if async_save == "True":  # with space again, the same command resumes from step 2
        proc = _main(env, workdir, "--config.checkpoint.keep_last=1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert checkpoint.complete_steps(str(workdir / "checkpoints")) == [STEPS]
        assert "resumed from" in (workdir / "log.txt").read_text()


# --- SIGTERM before the first step -------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_during_start_up_exits_cleanly_and_removes_the_lock(env, tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(cli_command("jaxlm.main", *_flags(workdir, env["cache"])), cwd=ROOT,
                            env=cli_env(1, env["jax"]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (workdir / "LOCK").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never took its lock"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM during start-up: exiting before the first step" in err
    assert "Traceback" not in err
    assert not (workdir / "LOCK").exists()
    assert checkpoint.complete_steps(str(workdir / "checkpoints")) == []


# --- one line per mistake ----------------------------------------------------------------------

def test_init_from_a_truncated_checkpoint_is_one_line_and_leaves_it_alone(env, tmp_path):
    source = _copy_run(env, tmp_path)
    _truncate_arrays(source / "checkpoints" / "4")
    before = _snapshot(source)
    proc = _main(env, tmp_path / "new", f"--config.init_from.path={source}")
    line = _one_error_line(proc)
    assert line.startswith(f"error: checkpoint 4 in {source / 'checkpoints'} cannot be read: "
                           "its files are damaged"), line
    assert "Event loop is closed" not in proc.stderr
    assert _snapshot(source) == before


def test_distill_teacher_with_another_vocabulary_is_one_line(env, tmp_path):
    proc = _main(env, tmp_path / "student", "--config.stage=distill",
                 f"--config.distill.teacher={env['run']}", "--config.model.vocab_size=1024")
    line = _one_error_line(proc)
    assert line.startswith("error: config key model.vocab_size: frozen model 'teacher'"), line
    assert "vocabulary of 400 ids" in line and "this run's model 1024" in line


@pytest.mark.slow
@pytest.mark.parametrize("docs,eval_docs,says", [
    (["", "", ""], None, "documents in a row had no tokens"),
    (["one lonely document"], ["one lonely document"], "no train document of")])
def test_empty_training_corpus_is_one_line(env, tmp_path, docs, eval_docs, says):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    flags = ["--config.data.source=files", f"--config.data.paths={train}",
             f"--config.data.tokenizer_path={_tokenizer(env)}"]
    if eval_docs is not None:
        held = tmp_path / "eval.jsonl"
        held.write_text("".join(json.dumps({"text": d}) + "\n" for d in eval_docs))
        flags.append(f"--config.data.eval_paths={held}")
    line = _one_error_line(_main(env, tmp_path / "run", *flags))
    assert says in line


def _tokenizer(env: dict) -> str:
    extra = json.loads((env["run"] / "checkpoints" / "4" / "extra" / "metadata").read_text())
    return extra["tokenizer_path"]


def test_workdir_that_is_a_file_is_one_line(env, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me\n")
    line = _one_error_line(_main(env, afile))
    assert line == (f"error: --workdir {afile} is a file, not a directory; give a directory "
                    "(it is created when missing)")
    assert afile.read_text() == "keep me\n"


@pytest.mark.parametrize("text", ['{"pid": "abc", "host": "x", "heartbeat": "y"}', "[1, 2]",
                                  ""])
def test_malformed_lock_refuses_while_fresh_and_is_taken_over_when_old(tmp_path, text, caplog):
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = workdir / "LOCK"
    lock.write_text(text)
    c = base_config()
    c.data.cache_dir = str(tmp_path / "cache")
    with pytest.raises(errors.WorkdirLockedError,
                       match=rf"workdir lock {lock} is malformed \(.+\) and was written \d+s "
                             "ago"):
        trainer.run(c, str(workdir))
    assert lock.read_text() == text  # the refused run leaves it as it was
    old = time.time() - workdir_lock.STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING"), workdir_lock.hold(str(workdir)) as held:
        assert json.loads(lock.read_text())["token"] == held.owner["token"]
    assert any("taking over the stale lock" in r.getMessage() and "malformed" in r.getMessage()
               for r in caplog.records)
    assert not lock.exists()


def test_eval_without_held_out_data_is_refused_before_anything_runs(env, tmp_path):
    workdir = tmp_path / "run"
    line = _one_error_line(_main(env, workdir, "--config.data.eval_fraction=0"))
    assert line.startswith("error: config key data.eval_fraction: is 0, so the evaluation "
                           "(eval.tokens=2048) has no held-out data"), line
    assert not workdir.exists()  # refused at validation: nothing created, nothing compiled


@pytest.mark.parametrize("overrides,key", [
    ({"data.source": "files", "data.paths": "/d/*.jsonl"}, "data.eval_paths"),
    ({"stage": "sft", "sft.paths": "/d/chat.jsonl"}, "sft.eval_paths"),
    ({"stage": "grpo", "rl.task": "jsonl", "rl.paths": "/d/p.jsonl",
      "init_from.path": "/d/run"}, "rl.eval_paths")])
def test_eval_fraction_zero_names_the_stages_held_out_files(overrides, key):
    c = base_config()
    c.data.eval_fraction = 0.0
    for dotted, value in overrides.items():
        section, _, name = dotted.rpartition(".")
        (c[section] if section else c)[name] = value
    with pytest.raises(errors.ConfigError, match=rf"data.eval_fraction: is 0 and {key} is empty"):
        validate(c)
    section, name = key.split(".")
    c[section][name] = "/d/held_out.jsonl"
    validate(c)  # held-out files stand in for the fraction
    c[section][name], c.eval.tokens, c.eval.examples = "", 0, 0
    validate(c)  # or no evaluation at all


@pytest.mark.parametrize("key,value,says", [
    ("eps", 0.0, "must be positive"), ("eps", -1e-8, "must be positive"),
    ("b1", 1.0, r"must lie in \[0, 1\)"), ("b1", -0.1, r"must lie in \[0, 1\)"),
    ("b2", 1.0, r"must lie in \[0, 1\)"), ("b2", 1.5, r"must lie in \[0, 1\)"),
    ("weight_decay", -0.01, "must be >= 0")])
def test_silent_wrong_optimizer_values_are_refused_naming_the_key(key, value, says):
    c = base_config()
    c.optim[key] = value
    with pytest.raises(errors.ConfigError, match=rf"^config key optim.{key}: {says}, got"):
        validate(c)
