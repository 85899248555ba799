"""Training-step throughput of a config: compile time, step time, tokens/s (total and per
device) and MFU.

    python benchmarks/train_throughput.py --config=configs/bench_cpu.py [--steps=20]

Runs the stage's real jitted train step (same shardings and donation as jaxlm.trainer) on
synthetic full-length batches, so the figure is the model and optimizer, not the input pipeline
(benchmarks/data_throughput.py measures that). Prints one markdown table row for
docs/benchmarks.md.
"""

from __future__ import annotations

import platform
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm import hardware, scaling, sharding
from jaxlm.models import Transformer
from jaxlm.models.attention import resolve_attention
from jaxlm.optim import learning_rate_schedule, make_optimizer
from jaxlm.stages import get_stage
from jaxlm.train_state import init_sharded_state

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_cpu.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps after two warm-up steps.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions; the best is reported.")


def synthetic_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full rows of one document each: every position carries loss."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(batch, length + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((batch, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
            "loss_mask": np.ones((batch, length), np.float32)}


def measure(config) -> dict[str, float]:
    config_lib.validate(config)
    mesh = sharding.make_mesh(config_lib.check_devices(config, jax.device_count()))
    model_cfg = config_lib.model_config(config, vocab_size=config.data.vocab_size)
    model = Transformer(model_cfg)
    steps = config.train.steps
    tx = make_optimizer(config.optim, steps)
    schedule = learning_rate_schedule(config.optim, steps)
    state, shardings = init_sharded_state(model, tx, mesh, jax.random.key(0), config.data.seq_len)
    train_fn, _ = get_stage(config.stage).make_steps(config, model, tx, schedule)
    batch = sharding.global_batch(
        synthetic_batch(config.train.global_batch_size, config.data.seq_len,
                        model_cfg.vocab_size), mesh)
    with sharding.activate(mesh):
        t0 = time.perf_counter()
        step = jax.jit(train_fn, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)),
                       donate_argnums=0).lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        for _ in range(_STEPS.value):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        best = min(best, (time.perf_counter() - t0) / _STEPS.value)
    flops = scaling.flops_per_step(model_cfg, config.data.seq_len, config.train.global_batch_size)
    peak, note = hardware.peak_flops_per_device(jax.devices()[0], config.model.compute_dtype)
    return {"compile_s": compile_s, "step_s": best,
            "tokens_per_sec": config_lib.tokens_per_step(config) / best,
            "tokens_per_sec_per_device": config_lib.tokens_per_step(config) / best
            / jax.device_count(),
            "mfu": hardware.mfu(flops, best, jax.device_count(), peak),
            "achieved_flops": flops / best, "peak_flops": peak, "peak_note": note,
            "params": scaling.count_params(model_cfg)["total"], "vocab": model_cfg.vocab_size}


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    r = measure(config)
    m = config.model
    shape = (f"{m.num_layers}L x {m.num_heads}H x d{m.d_model}, seq {config.data.seq_len}, "
             f"batch {config.train.global_batch_size}, vocab {r['vocab']}, {m.compute_dtype}")
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} ({platform.node()}); "
          f"peak {r['peak_flops'] / 1e9:.1f} GFLOP/s per device ({r['peak_note']})")
    print("| shape | params | attention | compile s | step ms | tokens/s | tokens/s/device | "
          "GFLOP/s/device | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {shape} | {r['params'] / 1e6:.2f}M | {resolve_attention(m.attention)} | "
          f"{r['compile_s']:.1f} | {1e3 * r['step_s']:.1f} | {r['tokens_per_sec']:,.0f} | "
          f"{r['tokens_per_sec_per_device']:,.0f} | "
          f"{r['achieved_flops'] / 1e9 / jax.device_count():.1f} | {100 * r['mfu']:.1f}% |")


if __name__ == "__main__":
    app.run(main)
