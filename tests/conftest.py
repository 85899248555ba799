"""Test setup: 8 emulated CPU devices, configured before JAX is imported anywhere, and one
persistent XLA compilation cache for the CLI runs the tests start."""

import atexit
import os
import shutil
import tempfile

from tests.cli import xla_flags

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The CLI runs the tests start compile the same tiny training programs many times: they share
# one persistent compilation cache (tests/cli.py passes it on), made here so that the xdist
# workers inherit it. A size limit turns on the cache's file lock for concurrent writers.
if "JAXLM_TEST_JIT_CACHE" not in os.environ:
    _jit_cache = tempfile.mkdtemp(prefix="jaxlm-test-jit-")
    os.environ["JAXLM_TEST_JIT_CACHE"] = _jit_cache
    atexit.register(shutil.rmtree, _jit_cache, True)
# The TPU ahead-of-time tests load libtpu (for its compiler only) in several processes at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# pytest-xdist hands whole files to the two workers in collection order (pyproject.toml turns
# off its reordering by test count). The files that take half a minute or more go first,
# longest first (pytest --durations=0), so that neither worker is left running one of them
# alone at the end; the rest follow in the usual order. Only the order changes.
_LONGEST_FIRST = (
    "test_tool_mistakes.py", "test_aot.py", "test_multihost.py", "test_kv_cache_int8.py",
    "test_distill.py", "test_rl.py", "test_restore.py", "test_run_mistakes.py",
    "test_perf_equivalence.py", "test_post_training_e2e.py", "test_main.py",
    "test_quant_lora.py", "test_resume.py", "test_rl_ppo.py", "test_hf_interop.py",
    "test_evaluation_engine.py", "test_generate.py", "test_robustness.py",
    "test_hf_generate.py", "test_stage_resume.py", "test_rl_ppo_resume.py",
    "test_sliding_window.py", "test_quant_checkpoint.py", "test_inference.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
