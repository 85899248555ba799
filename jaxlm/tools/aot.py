"""Ahead-of-time fit check: compiles a config's real programs for a Cloud TPU topology on a
machine without TPUs, and says whether they fit in each chip's HBM.

    pip install -e '.[tpu]'    # libtpu: the TPU compiler and its topology descriptions
    python -m jaxlm.tools.aot --config=configs/chinchilla_1b.py --topology=v5p-64
    python -m jaxlm.tools.aot --config=configs/llama_1b.py:stage=grpo --topology=v5p:2x2x1

`--topology` takes a Cloud TPU accelerator type (`v4-32`, `v5p-64`, `v5litepod-16` or `v5e-16`,
`v6e-8`) or a libtpu topology name (`v5p:2x4x4`). The programs are the ones `jaxlm.run.trainer`
runs, built by the same `jaxlm.run.program.build` on the config's mesh over the topology's
devices: the train step of every stage (pretrain, sft, dpo with its frozen reference, reward,
distill, the RL updates), LoRA's adapter-only optimizer state, the stage's batch layout, the state
donated, and the stage's other programs (`Program.programs`: an RL rollout with its KV cache, a
reward model's scoring, DPO's reference precompute). Nothing is allocated: every input is
abstract. Prints each program's per-device memory from `Compiled.memory_analysis()`, plus the
run-long arrays it does not take (the optimizer state while the rollout runs), against the HBM;
the compiled FLOPs from `cost_analysis()` against `jaxlm.scaling.flops`'s model FLOPs; and exits
with status 1 when a program does not fit.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from jaxlm.parallel import hardware, sharding
from jaxlm.run import config as config_lib
from jaxlm.run import errors
from jaxlm.run.program import build

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """How a Cloud TPU generation's accelerator types map onto libtpu topologies.

    Attributes:
      libtpu_name: generation name in libtpu topology strings ("v5p" in "v5p:2x4x4").
      dims: 3 for the 3D-torus pods (v4, v5p), 2 for the 2D slices (v5e, v6e).
      cores_per_chip: what the number in the accelerator type counts per chip (v4-8 and v5p-8
        count TensorCores, 2 per chip; v5litepod-8 and v6e-8 count chips).
      hbm_bytes: HBM of one chip (cloud.google.com/tpu/docs/<generation>).
    """

    libtpu_name: str
    dims: int
    cores_per_chip: int
    hbm_bytes: int


GENERATIONS = {
    "v4": TpuGeneration("v4", 3, 2, 32 * GiB),
    "v5p": TpuGeneration("v5p", 3, 2, 95 * GiB),
    "v5litepod": TpuGeneration("v5e", 2, 1, 16 * GiB),
    "v5e": TpuGeneration("v5e", 2, 1, 16 * GiB),
    "v6e": TpuGeneration("v6e", 2, 1, 32 * GiB),
}
_BY_LIBTPU_NAME = {g.libtpu_name: g for g in GENERATIONS.values()}


def slice_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The default chip grid of a slice: 4 chips = 2x2(x1), then the last of the smallest sides
    doubles (2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4, 2x2 -> 2x4 -> 4x4), as Cloud TPU lays
    out v4/v5p-N and v5e/v6e-N slices."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"a TPU slice has a power-of-two number of chips, got {chips}")
    shape = [1] * dims
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == smallest)
        shape[last] *= 2
    shape.sort()
    # A 4-chip v4/v5p slice is one 2x2x1 board, written with the 1 last.
    return (2, 2, 1) if dims == 3 and chips == 4 else tuple(shape)


def parse_topology(name: str) -> tuple[str, TpuGeneration]:
    """('v5p:2x4x4', generation) for 'v5p-64' or 'v5p:2x4x4'; ValueError naming the accepted
    forms otherwise."""
    explicit = re.fullmatch(r"(v\w+?):(\d+(?:x\d+)+)", name)
    if explicit and explicit.group(1) in _BY_LIBTPU_NAME:
        return name, _BY_LIBTPU_NAME[explicit.group(1)]
    typed = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
    if not typed:
        raise ValueError(f"--topology={name!r}: expected an accelerator type like v4-8, v5p-64, "
                         f"v5litepod-16, v5e-16, v6e-8 or a libtpu topology like v5p:2x2x1")
    gen = GENERATIONS[typed.group(1)]
    count = int(typed.group(2))
    if count % gen.cores_per_chip:
        raise ValueError(f"--topology={name!r}: {typed.group(1)}-N counts TensorCores, 2 per chip; "
                         "N must be even")
    chips = count // gen.cores_per_chip
    if gen.dims == 3 and chips < 4:
        raise ValueError(f"--topology={name!r}: the smallest {typed.group(1)} slice is "
                         f"{typed.group(1)}-8 (2x2x1 chips)")
    shape = slice_shape(chips, gen.dims)
    return f"{gen.libtpu_name}:{'x'.join(map(str, shape))}", gen


def topology_devices(topology: str) -> list[Any]:
    """Compile-only TPU devices of `topology` from libtpu (no TPU needs to be attached)."""
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError("libtpu is not installed: pip install 'jaxlm[tpu]' (or 'jax[tpu]')")
    # libtpu otherwise asks the (absent) GCE metadata server which hosts form the slice.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(topology, "tpu").devices)


@dataclasses.dataclass
class ProgramMemory:
    """What the compiler says about one program on one topology (bytes are per device).

    Attributes:
      name: "train step", or the `Program.programs` name ("rollout", "reward_score", ...).
      resident_bytes: the run's long-lived arrays that are not its arguments but stay in HBM
        while it runs (`Program.resident`: the optimizer state during a rollout, ...).
      temporaries: named large values of one call, per-device estimate (global bytes split
        over the data-parallel devices): the rollout's KV cache.
      model_flops: `jaxlm.scaling.flops`'s FLOPs of one call.
    """

    name: str
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    resident_bytes: int = 0
    temporaries: dict[str, int] = dataclasses.field(default_factory=dict)
    compiled_flops_per_device: float = 0.0
    model_flops: float = 0.0
    compiler_error: str = ""

    @property
    def total_bytes(self) -> int:
        """Peak HBM of the program itself: live arguments and outputs (donated ones counted
        once) plus temporaries and the program's code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def peak_bytes(self) -> int:
        """HBM in use while it runs: its own total and the run-long arrays beside it."""
        return self.total_bytes + self.resident_bytes


@dataclasses.dataclass
class FitReport:
    """What the compiler says about a run's programs on one topology: `programs[0]` is the
    train step, then the stage's other programs. `fits`: every program's peak fits the HBM."""

    topology: str
    device_kind: str
    num_devices: int
    devices_per_chip: int
    mesh_shape: dict[str, int]
    attention: str
    hbm_per_device: int
    fits: bool
    programs: list[ProgramMemory] = dataclasses.field(default_factory=list)
    model_flops_per_step: float = 0.0
    largest_state_shards: list[tuple[str, int, tuple[int, ...]]] = dataclasses.field(
        default_factory=list)
    # Of the first program that does not fit, when it is the train step.
    largest_intermediates: list[tuple[str, int, tuple[int, ...]]] = dataclasses.field(
        default_factory=list)

    @property
    def train(self) -> ProgramMemory:
        return self.programs[0]

    def program(self, name: str) -> ProgramMemory:
        return next(p for p in self.programs if p.name == name)


def device_bytes(tree: Any) -> int:
    """Bytes of one device's shards of abstract arrays (ShapeDtypeStructs with shardings)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


def _largest_shards(state: Any, top: int = 8) -> list[tuple[str, int, tuple[int, ...]]]:
    """The biggest per-device pieces of the train state: (path, bytes, shard shape)."""
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        rows.append((jax.tree_util.keystr(path), math.prod(shard) * leaf.dtype.itemsize, shard))
    return sorted(rows, key=lambda r: -r[1])[:top]


def all_eqns(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, its sub-jaxprs' (scan, remat, custom-VJP, pjit bodies)
    included, each body's after the equation that holds it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from all_eqns(inner)


def _largest_intermediates(jaxpr: Any, batch: int, dp: int, top: int = 8
                           ) -> list[tuple[str, int, tuple[int, ...]]]:
    """The biggest values the step computes (walking into scan/remat/custom-VJP bodies): (primitive,
    estimated bytes per device, global shape). An array with a dimension that is a multiple of
    the global batch (the batch, or batch x length flattened) counts as split over the `dp`
    data-parallel devices; the estimate ignores tensor parallelism and XLA's fusion."""
    found: dict[tuple[str, tuple[int, ...]], int] = {}
    for eqn in all_eqns(jaxpr.jaxpr):
        for var in eqn.outvars:
            aval = var.aval
            if not hasattr(aval, "shape") or not aval.shape:
                continue
            size = math.prod(aval.shape) * aval.dtype.itemsize
            if any(dim % batch == 0 for dim in aval.shape):
                size //= dp
            found[(eqn.primitive.name, tuple(aval.shape))] = size
    rows = [(name, size, shape) for (name, shape), size in found.items()]
    return sorted(rows, key=lambda r: -r[1])[:top]


def _measure(memory: ProgramMemory, lowered: Any) -> bool:
    """Compiles `lowered` into `memory`'s fields; False when the compiler ran out of HBM."""
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        memory.compiler_error = str(e)
        return False
    mem = compiled.memory_analysis()
    memory.argument_bytes = mem.argument_size_in_bytes
    memory.output_bytes = mem.output_size_in_bytes
    memory.alias_bytes = mem.alias_size_in_bytes
    memory.temp_bytes = mem.temp_size_in_bytes
    memory.code_bytes = mem.generated_code_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory.compiled_flops_per_device = float(cost.get("flops", 0.0))
    return True


def check_fit(config: ml_collections.ConfigDict, topology: str) -> FitReport:
    """Compiles the config's train step and the stage's other programs for `topology` and
    measures each against the HBM."""
    config_lib.validate(config)
    libtpu_name, gen = parse_topology(topology)
    devices = topology_devices(libtpu_name)
    chips = len({tuple(d.coords) for d in devices})
    per_chip = len(devices) // chips
    mesh_shape = config_lib.check_devices(config, len(devices))
    mesh = sharding.make_mesh(mesh_shape, devices)
    # platform="tpu": attention="auto" must pick the TPU kernel (Splash), not the one of the
    # machine compiling.
    program = build(config, mesh, vocab_size=config.data.vocab_size, platform="tpu")
    report = FitReport(
        topology=libtpu_name, device_kind=devices[0].device_kind, num_devices=len(devices),
        devices_per_chip=per_chip, mesh_shape=mesh_shape,
        attention=program.model_cfg.attention, hbm_per_device=gen.hbm_bytes // per_chip,
        fits=False, model_flops_per_step=program.flops_per_step,
        largest_state_shards=_largest_shards(program.abstract_state))
    resident = {name: device_bytes(tree) for name, tree in program.resident().items()}
    dp = sharding.data_parallel_size(mesh)

    def beside(reads: tuple[str, ...]) -> int:
        return sum(size for name, size in resident.items() if name not in reads)

    train = ProgramMemory("train step", resident_bytes=beside(program.train_reads),
                          model_flops=program.train_step_flops)
    report.programs.append(train)
    with sharding.activate(mesh):
        traced = program.train_step.trace(*program.abstract_args())
        lowered = traced.lower()
    compiled = _measure(train, lowered)
    for name, jitted in program.programs.items():
        memory = ProgramMemory(name, resident_bytes=beside(jitted.reads),
                               temporaries={k: v // dp for k, v in jitted.temporaries.items()},
                               model_flops=jitted.flops)
        report.programs.append(memory)
        _measure(memory, program.lower(name))
    report.fits = all(not p.compiler_error and p.peak_bytes <= report.hbm_per_device
                      for p in report.programs)
    if not compiled or train.peak_bytes > report.hbm_per_device:
        report.largest_intermediates = _largest_intermediates(
            traced.jaxpr, config.train.global_batch_size, dp)
    return report


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _size(n: float) -> str:
    """GiB, or MiB below a tenth of one (a small model's KV cache)."""
    return _gib(n) if n >= GiB / 10 or n == 0 else f"{n / 2**20:.2f} MiB"


def _memory_rows(r: FitReport) -> list[str]:
    width = max(len(p.name) for p in r.programs)
    cols = ("arguments", "outputs", "donated", "temporaries", "code", "total", "+resident",
            "=peak")
    lines = [f"per-device memory of each program, against {_gib(r.hbm_per_device)} of HBM "
             "(total = arguments + outputs - donated + temporaries + code; +resident: the "
             "run's long-lived arrays it does not take, e.g. the optimizer state during the "
             "rollout):",
             "  " + "program".ljust(width) + "".join(f"{c:>12}" for c in cols)]
    for p in r.programs:
        if p.compiler_error:
            lines.append(f"  {p.name.ljust(width)}  compiler: out of memory (below)")
            continue
        values = (p.argument_bytes, p.output_bytes, p.alias_bytes, p.temp_bytes, p.code_bytes,
                  p.total_bytes, p.resident_bytes, p.peak_bytes)
        lines.append(f"  {p.name.ljust(width)}" + "".join(f"{_size(v):>12}" for v in values)
                     + f"  {100 * p.peak_bytes / r.hbm_per_device:.0f}%")
    for p in r.programs:
        for what, size in p.temporaries.items():
            lines.append(f"  {p.name}: {what} {_size(size)} per device (estimate: its rows "
                         f"split over data parallelism), part of its temporaries")
    return lines


def format_report(r: FitReport) -> str:
    """The human-readable verdict `main` prints."""
    chip_note = (f" ({r.devices_per_chip} devices per chip: one per TensorCore, each with "
                 f"1/{r.devices_per_chip} of the chip's HBM)" if r.devices_per_chip > 1 else "")
    lines = [f"topology {r.topology}: {r.num_devices} x {r.device_kind}{chip_note}",
             "mesh " + ", ".join(f"{k}={v}" for k, v in r.mesh_shape.items())
             + f"; attention {r.attention}"]
    lines += _memory_rows(r)
    peak = hardware.lookup_peak(r.device_kind)
    if peak is not None:
        per_device = peak.bfloat16 / r.devices_per_chip
        ideal_s = r.model_flops_per_step / (r.num_devices * per_device)
        lines.append(f"step time at 100% / 50% MFU ({peak.name}, {per_device / 1e12:.0f} "
                     f"TFLOP/s bf16 per device): {1e3 * ideal_s:.1f} / {2e3 * ideal_s:.1f} ms")
    lines.append(f"model FLOPs per step (jaxlm.scaling.flops, what MFU counts): "
                 f"{r.model_flops_per_step:.3e}")
    for p in r.programs:
        if not p.compiler_error:
            lines.append(f"  {p.name}: model {p.model_flops:.3e}; compiled "
                         f"{p.compiled_flops_per_device * r.num_devices:.3e} = {r.num_devices} x "
                         f"{p.compiled_flops_per_device:.3e}")
    lines.append("  (XLA's cost analysis counts a loop body once: scanned layers, loss chunks, "
                 "microbatches and decode steps count once)")
    worst = max(r.programs, key=lambda p: p.peak_bytes)
    if r.fits:
        lines.append(f"FITS: {_gib(worst.peak_bytes)} of {_gib(r.hbm_per_device)} per device "
                     f"at the peak ({worst.name})")
        return "\n".join(lines)
    lines.append(f"DOES NOT FIT in {_gib(r.hbm_per_device)} of HBM per device: "
                 + ", ".join(p.name for p in r.programs
                             if p.compiler_error or p.peak_bytes > r.hbm_per_device))
    for p in r.programs:
        if p.compiler_error:
            allocations = p.compiler_error.split("Largest program allocations", 1)
            lines.append(f"compiler ({p.name}): " + p.compiler_error.split("\n", 1)[0][:400])
            if len(allocations) == 2:
                lines.append("largest program allocations" + allocations[1].rstrip())
    if r.largest_intermediates:
        lines.append("largest values the train step computes (per device, batch split over "
                     "data parallelism; global shape):")
        lines += [f"  {_gib(size):>12}  {name} {shape}"
                  for name, size, shape in r.largest_intermediates]
    lines.append("largest train-state shards per device:")
    lines += [f"  {_gib(size):>12}  {path} {shape}" for path, size, shape in
              r.largest_state_shards]
    return "\n".join(lines)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "Cloud TPU accelerator type (v5p-64, "
                                "v5litepod-16, v6e-8, v4-32) or libtpu topology (v5p:2x4x4).")


def main(argv: list[str]) -> None:
    del argv
    # Host arrays stay on CPU; the TPU devices exist only in the compiler.
    jax.config.update("jax_platforms", "cpu")
    report = check_fit(_CONFIG.value, _TOPOLOGY.value)
    print(format_report(report))
    sys.exit(0 if report.fits else 1)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(lambda argv: errors.run_main(main, argv))
