"""Training-step throughput of a config: compile time, step time, tokens/s (total and per
device) and MFU.

    python benchmarks/train_throughput.py --config=configs/bench_cpu.py [--steps=20]

Runs the stage's real jitted train step, built by `jaxlm.run.program.build` exactly as
jaxlm.run.trainer builds it (shardings, donation, LoRA's frozen base, a DPO reference), on
synthetic full-length batches of the stage's layout, so the figure is the model and optimizer,
not the input pipeline (benchmarks/data_throughput.py measures that). MFU counts the train
step's own work (`Program.train_step_flops`; an RL stage's rollout is not timed here). Prints
one markdown table row for docs/benchmarks.md.
"""

from __future__ import annotations

import platform
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxlm.models.attention import resolve_attention
from jaxlm.parallel import hardware, sharding
from jaxlm.run import config as config_lib
from jaxlm.run.program import Program, build
from jaxlm.scaling import flops as scaling
from jaxlm.weights import frozen as frozen_models
from jaxlm.weights import init_from as params_from

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_cpu.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps after two warm-up steps.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions; the best is reported.")


def synthetic_batch(program: Program, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch of the stage's layout: full rows of one document each, every position
    carrying loss (pairs: chosen and rejected both full)."""
    rng = np.random.default_rng(seed)
    vocab = program.model_cfg.vocab_size
    out = {}
    for name, spec in program.abstract_batch.items():
        shape, dtype = spec.shape, spec.dtype
        if name == "positions":
            out[name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        elif name in ("segment_ids", "loss_mask"):
            out[name] = np.ones(shape, dtype)
        elif name in ("inputs", "targets"):
            out[name] = rng.integers(0, vocab, size=shape).astype(dtype)
        elif name == "pair_id":
            out[name] = np.arange(shape[0], dtype=dtype)
        else:
            out[name] = np.zeros(shape, dtype)
    return out


def measure(config) -> dict[str, float]:
    config_lib.validate(config)
    mesh = sharding.make_mesh(config_lib.check_devices(config, jax.device_count()))
    program = build(config, mesh, vocab_size=config.data.vocab_size)
    state = program.init_state(jax.random.key(0))
    reference = program.extra_args(
        params_from.frozen_copy(program, state.params) if program.uses_reference else None,
        frozen_models.random_params(program.frozen, jax.random.key(1), config.data.seq_len))
    batch = sharding.global_batch(synthetic_batch(program), mesh)
    t0 = time.perf_counter()
    step = program.compile_train()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, metrics = step(state, batch, *reference)
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        for _ in range(_STEPS.value):
            state, metrics = step(state, batch, *reference)
        jax.block_until_ready((state, metrics))
        best = min(best, (time.perf_counter() - t0) / _STEPS.value)
    flops = program.train_step_flops  # the train step alone is timed
    peak, note = hardware.peak_flops_per_device(jax.devices()[0], config.model.compute_dtype)
    tokens = program.tokens_per_step
    return {"compile_s": compile_s, "step_s": best,
            "tokens_per_sec": tokens / best,
            "tokens_per_sec_per_device": tokens / best / jax.device_count(),
            "mfu": hardware.mfu(flops, best, jax.device_count(), peak),
            "achieved_flops": flops / best, "peak_flops": peak, "peak_note": note,
            "params": scaling.count_params(program.model_cfg)["total"],
            "vocab": program.model_cfg.vocab_size}


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
