"""One process of the multi-process tests in tests/test_distributed.py.

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    JAXLM_COORDINATOR_ADDRESS=127.0.0.1:PORT JAXLM_NUM_PROCESSES=2 JAXLM_PROCESS_ID=I \
    python -m tests.distributed_worker OUT_PREFIX [--task=step|gather] [--fail-process=K]

joins the job through `jaxlm.parallel.distributed.initialize` (topology from the JAXLM_* variables,
as
launch/local.sh sets them) and writes `OUT_PREFIX.<process index>.json`:

* `--task=step`: one jitted pretrain step of a tiny model on a (data=2, fsdp=2, tensor=2) mesh
  over every process's devices, this process feeding only the rows it holds; the loss, gradient
  norm and updated-parameter norm come out replicated, so every process can read them.
* `--task=gather`: every process's index, all-gathered across processes.

`--fail-process=K` makes process K exit with status 3 before joining (tests launch/local.sh's
failure handling). The test process imports `train_step_metrics` to compute the same step on one
process with 8 devices.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import ml_collections
import numpy as np

MESH_SIZES = {"data": 2, "fsdp": 2, "tensor": 2, "pipeline": 1}
BATCH, LENGTH = 8, 16


def global_batch_np() -> dict[str, np.ndarray]:
    from tests.model_fixtures import LLAMA_TINY, packed_batch
    return packed_batch(BATCH, LENGTH, LLAMA_TINY.vocab_size, seed=4)


def process_rows(mesh) -> list[int]:
    """The global batch rows this process's devices hold (what its data pipeline would read)."""
    from jaxlm.parallel import sharding
    index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map((BATCH, LENGTH))
    return sorted({r for idx in index_map.values() for r in range(*idx[0].indices(BATCH))})


def train_step_metrics(mesh, local_batch: dict[str, np.ndarray]) -> dict[str, float]:
    """One pretrain step; `local_batch` holds this process's rows of the global batch."""
    import jax
    import optax

    from jaxlm.models import Transformer
    from jaxlm.parallel import sharding
    from jaxlm.run.optim import learning_rate_schedule, make_optimizer
    from jaxlm.run.train_state import init_sharded_state
    from jaxlm.stages.pretrain import pretrain_step
    from tests.model_fixtures import LLAMA_TINY

    optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-2, warmup_steps=0, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-3,
        weight_decay=0.1, decay_embeddings=False, clip_norm=1.0))
    model = Transformer(LLAMA_TINY)
    tx = make_optimizer(optim, total_steps=10)
    state, shardings = init_sharded_state(model, tx, mesh, jax.random.key(0), LENGTH)
    step = functools.partial(pretrain_step, model=model, tx=tx,
                             lr_schedule=learning_rate_schedule(optim, 10))
    replicated = sharding.replicated(mesh)
    with sharding.activate(mesh):
        jitted = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                         out_shardings=(shardings, replicated), donate_argnums=0)
        new_state, metrics = jitted(state, sharding.global_batch(local_batch, mesh))
        param_norm = jax.jit(optax.global_norm, out_shardings=replicated)(new_state.params)
    out = {k: float(metrics[k]) for k in ("loss", "grad_norm", "num_tokens")}
    out["new_param_norm"] = float(param_norm)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_prefix")
    parser.add_argument("--task", choices=("step", "gather"), default="step")
    parser.add_argument("--fail-process", type=int, default=-1)
    args = parser.parse_args(argv)
    if int(os.environ.get("JAXLM_PROCESS_ID", "-1")) == args.fail_process:
        print("failing on purpose before joining", flush=True)
        return 3

    from jaxlm.parallel import distributed
    cfg = distributed.default_distributed_config()
    cfg.initialization_timeout = 60
    distributed.initialize(cfg)  # before anything below touches devices

    import jax
    from jax.experimental import multihost_utils

    from jaxlm.parallel import sharding

    result: dict = {"process_index": jax.process_index(), "process_count": jax.process_count(),
                    "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                    "is_primary": distributed.is_primary()}
    if args.task == "gather":
        gathered = multihost_utils.process_allgather(np.array([jax.process_index()]))
        result["gathered"] = np.asarray(gathered).reshape(-1).tolist()
    else:
        mesh = sharding.make_mesh(MESH_SIZES)
        rows = process_rows(mesh)
        local = {k: v[rows] for k, v in global_batch_np().items()}
        result["rows"] = rows
        result["metrics"] = train_step_metrics(mesh, local)
    path = f"{args.out_prefix}.{jax.process_index()}.json"
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    print(f"process {jax.process_index()} wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
