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
