"""Scoring throughput of `jaxlm.eval`'s engine against the training step of the same model, in
one process on the same machine.

    python benchmarks/eval_throughput.py [--config=configs/tiny.py] [--tokens=120000]

The model is the config's (random weights: speed does not depend on them) on one device. The
training step is the program builder's jitted, donated train step on synthetic full rows (as
benchmarks/train_throughput.py times it); scoring is `jaxlm.evaluation.engine.Engine` at
`jaxlm.eval`'s default batch size on two workloads of random token ids:

    rolling         log-likelihood of whole documents (corpus_bpb, a harness perplexity task):
                    --tokens tokens in documents of fixed-seed log-normal lengths (median 300
                    tokens, 8-4000), longer ones scored in rolling windows of the context
    loglikelihood   4-way multiple choice (next_line, a harness choice task): contexts of
                    20-120 tokens, continuations of 2-24 tokens, --tokens / 20 requests

Scoring tokens/s counts the scored tokens (continuations, every document token). A forward
pass costs about a third of a training step (forward + backward), so 3x the training step's
tokens/s is parity with its efficiency. Each figure is the best of --repeats timed passes after
an untimed one (which compiles), the workloads taking turns, and also as scored tokens per
second of the process's CPU time, which a machine shared with other jobs disturbs far less than
wall time. Prints the /proc/pressure/cpu line before and after, and a markdown table for
docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm.evaluation.engine import Engine, rolling_windows  # noqa: E402
from jaxlm.parallel import sharding  # noqa: E402
from jaxlm.run import config as config_lib  # noqa: E402
from jaxlm.run.program import build  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_TOKENS = flags.DEFINE_integer("tokens", 120_000, "Scored tokens of the rolling workload.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Engine batch size (jaxlm.eval's default).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed training steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the best is reported.")


@dataclasses.dataclass(frozen=True)
class _Ids:
    """The token ids the engine needs from a tokenizer (the workloads are ids already)."""

    pad_id: int = 0
    prefix_id: int = 1
    eos_id: int = 2
    name: str = "random ids"


def cpu_pressure() -> str:
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().strip()
    except OSError:
        return "n/a"


def rolling_docs(tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < tokens:
        n = int(np.clip(rng.lognormal(np.log(300), 1.0), 8, 4000))
        n = min(n, tokens - total)
        docs.append(rng.integers(3, vocab, n).tolist())
        total += n
    return docs


def choice_requests(n: int, vocab: int, seed: int = 1) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n // 4):
        ctx = rng.integers(3, vocab, int(rng.integers(20, 121))).tolist()
        out += [(ctx, rng.integers(3, vocab, int(rng.integers(2, 25))).tolist())
                for _ in range(4)]
    return out


def pretrain_batch(program, seed: int = 0) -> dict[str, np.ndarray]:
    """Full rows of random tokens, one document each, every position scored."""
    b, length = program.abstract_batch["inputs"].shape
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, program.model_cfg.vocab_size, (b, length + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
            "segment_ids": np.ones((b, length), np.int32),
            "loss_mask": np.ones((b, length), np.float32)}


@dataclasses.dataclass
class Timing:
    """The best wall seconds and the fewest process CPU seconds over the timed repeats."""

    wall: float = float("inf")
    cpu: float = float("inf")

    def time(self, fn) -> None:
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        self.wall = min(self.wall, time.perf_counter() - w0)
        self.cpu = min(self.cpu, time.process_time() - c0)


def train_steps(config, mesh, vocab: int):
    """(program, a function running --steps train steps, a function giving the params)."""
    program = build(config, mesh, vocab_size=vocab)
    box = [program.init_state(jax.random.key(0))]
    batch = sharding.global_batch(pretrain_batch(program), mesh)
    step = program.compile_train()

    def steps() -> None:
        s = box[0]
        for _ in range(_STEPS.value):
            s, metrics = step(s, batch)
        jax.block_until_ready((s, metrics))
        box[0] = s

    return program, steps, lambda: box[0].params


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    config_lib.validate(config)
    vocab = config.data.vocab_size
    before = cpu_pressure()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1},
                              devices=jax.devices()[:1])
    program, steps, params = train_steps(config, mesh, vocab)
    steps()  # warm-up
    # A copy: the train step donates the state, params included.
    engine = Engine(program.model_cfg, jax.tree.map(jnp.copy, params()), _Ids(), mesh,
                    batch_size=_BATCH.value)
    docs = rolling_docs(_TOKENS.value, vocab)
    pairs = choice_requests(_TOKENS.value // 20, vocab)
    windows = [w for d in docs for w in rolling_windows(d, 1, engine.max_length)]
    # (name, work, scored tokens, tokens through the forward pass)
    workloads = [
        ("training step (forward + backward)", steps, _STEPS.value * program.tokens_per_step,
         _STEPS.value * program.tokens_per_step),
        (f"rolling: {len(docs)} documents, {len(windows)} windows",
         lambda: engine.loglikelihood_rolling(docs), sum(map(len, docs)),
         sum(len(c) + len(x) - 1 for c, x in windows)),
        (f"loglikelihood: {len(pairs)} requests", lambda: engine.loglikelihood(pairs),
         sum(len(x) for _, x in pairs),
         sum(min(len(c) + len(x), engine.max_length + 1) - 1 for c, x in pairs)),
    ]
    for _, work, _, _ in workloads[1:]:
        work()  # compiles
    timings = [Timing() for _ in workloads]
    for _ in range(_REPEATS.value):  # interleaved, so a busy spell hits every workload alike
        for (_, work, _, _), timing in zip(workloads, timings):
            timing.time(work)
    after = cpu_pressure()
    m = config.model
    print(f"device: {jax.devices()[0].device_kind} x 1 ({platform.node()}, "
          f"{os.cpu_count()} cores); model {m.num_layers}L x {m.num_heads}H x d{m.d_model}, "
          f"seq {config.data.seq_len}, vocab {vocab}, {m.compute_dtype}; engine batch "
          f"{_BATCH.value}; best of {_REPEATS.value} interleaved repeats")
    print(f"/proc/pressure/cpu before: {before}")
    print(f"/proc/pressure/cpu after:  {after}")
    print("| workload | scored tokens | scored tokens/s | vs training step | "
          "scored tokens per CPU s | vs training step | forward tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    train = timings[0]
    base_wall = workloads[0][2] / train.wall
    base_cpu = workloads[0][2] / train.cpu
    for (name, _, scored, forward), t in zip(workloads, timings):
        print(f"| {name} | {scored:,} | {scored / t.wall:,.0f} | "
              f"{scored / t.wall / base_wall:.2f}x | {scored / t.cpu:,.0f} | "
              f"{scored / t.cpu / base_cpu:.2f}x | {forward / t.wall:,.0f} |")


if __name__ == "__main__":
    app.run(main)
