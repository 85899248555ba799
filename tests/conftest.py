"""Test setup: 8 emulated CPU devices, configured before JAX is imported anywhere, and one
persistent XLA compilation cache for the whole run."""

import atexit
import os
import shutil
import tempfile

from tests.cli import xla_flags

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite runs the same tiny programs many times, in the test processes and in the CLI runs they
# start (which inherit this environment): a compilation cache shared by all of them compiles each
# program once. A size limit turns on the cache's file lock, so concurrent writers are safe.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jit_cache = tempfile.mkdtemp(prefix="jaxlm-test-jit-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jit_cache
    atexit.register(shutil.rmtree, _jit_cache, True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
# The TPU ahead-of-time tests load libtpu (for its compiler only) in several processes at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
