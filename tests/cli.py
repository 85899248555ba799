"""Running jaxlm's command-line entry points from tests, one way for every test file.

    proc = run_cli("jaxlm.main", "--config=configs/tiny.py", f"--workdir={w}", *TINY_MODEL)
    proc = run_cli("jaxlm.tools.eval", f"--workdir={w}", check=False)   # expect a failure

Each call is a fresh `python -m <module>` in the repository root, on CPU with `devices` emulated
devices, optionally sharing a JAX compilation cache across the calls of a module (a restarted
run then compiles nothing anew). `check=True` fails the test with the tail of stderr when the
command exits non-zero.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# The tests compile hundreds of tiny programs that then run for milliseconds, so compile time is
# most of their time: LLVM's optimisation passes (without them the suite runs in under half the
# time) and XLA:CPU's MLIR fusion emitters (the older elemental emitter compiles a tiny train step
# about 40% sooner). Results do not depend on either: every program a test compares is compiled
# the same way, and benchmarks and runs outside the tests keep XLA's defaults.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS of a test process: `devices` emulated CPU devices, unoptimised CPU code."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


# A model and data small enough that a run of a few steps takes seconds; its evaluations read
# 4 batches (configs/tiny.py's 32k tokens would be 128), and its MFU is against a fixed peak
# (no start-up matmul benchmark, about a second of every run).
TINY_MODEL = ("--config.model.d_model=32", "--config.model.num_layers=1",
              "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
              "--config.model.d_ff=64", "--config.data.seq_len=32",
              "--config.data.vocab_size=400", "--config.data.max_documents=60",
              "--config.train.global_batch_size=8", "--config.eval.tokens=1024",
              "--config.log.peak_flops=1e11")
# Logging every step to metrics.jsonl only, no samples, synchronous checkpoints.
QUIET_LOG = ("--config.log.sample_every=0", "--config.log.tensorboard=False",
             "--config.log.every_steps=1", "--config.checkpoint.async_save=False")


def cli_env(devices: int | None = 1, jax_cache: Path | None = None,
            **extra: str) -> dict[str, str]:
    """The environment of a CLI run: CPU, `devices` emulated devices (None: inherit), and a
    persistent compilation cache: `jax_cache` when given (every program cached), else the suite's
    (programs that take over a second to compile)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    if devices is not None:
        env["XLA_FLAGS"] = xla_flags(devices)
    if jax_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(jax_cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    elif "JAXLM_TEST_JIT_CACHE" in os.environ:  # the suite's cache (tests/conftest.py)
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAXLM_TEST_JIT_CACHE"]
        env.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    return env


def cli_command(module: str, *args: str) -> list[str]:
    """`python -m <module> <args>` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def run_cli(module: str, *args: str, devices: int | None = 1, jax_cache: Path | None = None,
            check: bool = True, timeout: float = 900,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m <module> <args>` in the repository root and returns the finished process
    (text stdout/stderr). check: fail the test unless it exits 0."""
    proc = subprocess.run(cli_command(module, *args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env(devices, jax_cache))
    if check and proc.returncode != 0:
        pytest.fail(f"python -m {module} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc
