#!/usr/bin/env bash
# The one device command of a GPU benchmark run (H100/H200), about 8 minutes:
#
#   bash benchmarks/gpu_suite.sh [gpu_suite.py flags, e.g. --cases=chinchilla --xla_flags=...]
#
# 1. installs the wheels in .whl/, if any (packages jaxlm needs that the image lacks), into
#    /tmp/site, without touching the image's jax/numpy;
# 2. prints nvidia-smi, versions and jax.devices(), and imports jaxlm.run.trainer;
# 3. runs tests/test_attention_impls.py -k cudnn on the GPU (tests/conftest.py only
#    setdefaults JAX_PLATFORMS=cpu, so JAX_PLATFORMS=cuda here wins) -> $OUT/pytest_cudnn.txt;
# 4. runs benchmarks/gpu_suite.py with BUDGET_S (default 400) -> $OUT/gpu_suite.{md,jsonl},
#    $OUT/trace.tgz.
# Everything is also in $OUT/log.txt. OUT defaults to /tmp/out; GPU_SUITE_SKIP_PYTEST=1 skips 3.
# Env: BUDGET_S, EXTRA_XLA_FLAGS (appended to XLA_FLAGS of every case), PYTHON (python3),
# PYTEST_JAX_PLATFORMS (cuda). On a CPU machine, to try the script itself:
#   PYTHON=/path/to/venv/bin/python PYTEST_JAX_PLATFORMS=cpu BUDGET_S=150 \
#     bash benchmarks/gpu_suite.sh --case_set=cpu --steps=2 --repeats=1 --profile_config=tiny
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
export OUT
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-400}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

main() {
  local t0=$SECONDS
  echo "== $(date -u '+%F %T UTC') $(hostname) repo $(git rev-parse --short HEAD 2>/dev/null)"
  if compgen -G ".whl/*.whl" >/dev/null; then
    ls -la .whl/
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "FATAL: wheel install failed"; return 1; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl/ wheels: using the image's packages only"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  echo "== nvidia-smi"
  timeout 30 nvidia-smi || echo "(no nvidia-smi)"
  timeout 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version \
    --format=csv 2>/dev/null
  echo "== versions"
  "$PYTHON" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|orbax|chex|numpy|ml.dtypes|protobuf|grain|array.record|ml.collections|tensorboardx|portpicker|etils|nvidia-cudnn) ' || true
  echo "XLA_FLAGS=${XLA_FLAGS:-} EXTRA_XLA_FLAGS=${EXTRA_XLA_FLAGS:-}"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 "$PYTHON" -c "
import sys, jax
print('python', sys.version.split()[0], '| jax', jax.__version__, '| backend',
      jax.default_backend(), '| devices', jax.devices())
import ml_collections, jaxlm.stages, jaxlm.run.train_state
print('imports the suite needs: ok')
import grain, tensorboardX, jaxlm.run.trainer, jaxlm.main
print('imports of the trainer (grain, array_record, tensorboardX): ok')
" || echo "WARNING: device / import check failed (see above)"

  if [ "${GPU_SUITE_SKIP_PYTEST:-0}" != 1 ]; then
    local platforms=${PYTEST_JAX_PLATFORMS:-cuda}
    echo "== pytest tests/test_attention_impls.py -k cudnn (JAX_PLATFORMS=$platforms)"
    JAX_PLATFORMS=$platforms timeout 180 "$PYTHON" -m pytest -q -n 0 -rA \
      tests/test_attention_impls.py -k cudnn 2>&1 | tee "$OUT/pytest_cudnn.txt"
    echo "pytest exit: $?"
    if grep -qE '(^| )1 passed' "$OUT/pytest_cudnn.txt" && ! grep -q skipped "$OUT/pytest_cudnn.txt"; then
      echo "cudnn test: PASSED on GPU"
    else
      echo "WARNING: cudnn test did not pass on the GPU (failed or skipped): see pytest_cudnn.txt"
    fi
  fi
  echo "== setup took $((SECONDS - t0)) s"

  echo "== gpu_suite (budget ${BUDGET_S} s)"
  timeout $((${BUDGET_S%.*} + 120)) "$PYTHON" benchmarks/gpu_suite.py --budget_s="$BUDGET_S" "$@"
  local rc=$?
  echo "== gpu_suite exit $rc; total $((SECONDS - t0)) s; files in $OUT:"
  ls -la "$OUT"
  return $rc
}

main "$@" 2>&1 | tee "$OUT/log.txt"
