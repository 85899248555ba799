"""Peak FLOP/s of the device a run uses, and model FLOPs utilisation (MFU).

Accelerators are looked up by `jax.Device.device_kind` in a table of vendor-published dense
(no structured sparsity) matmul peaks. CPUs, and any kind the table does not know, are measured
once per process with a jitted matmul, so MFU stays meaningful in CPU tests and on new hardware.

Dtypes: "bfloat16" is the tensor-core / MXU bf16 peak (fp16 is the same on every device listed).
"float32" on NVIDIA is the TF32 tensor-core peak, which is what XLA uses for float32 matmuls at
JAX's default precision on Ampere and later; on TPU a default-precision float32 matmul is a
single bf16 MXU pass, so it gets the bf16 figure.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

_DTYPE_ALIASES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "bfloat16", "fp16": "bfloat16",
    "float32": "float32", "fp32": "float32", "f32": "float32", "tf32": "float32",
}


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """Dense matmul peak FLOP/s of one JAX device, per dtype, and where the figures come from."""

    name: str
    bfloat16: float
    float32: float
    source: str


def _tpu(name: str, bf16: float, source: str) -> DevicePeak:
    return DevicePeak(name, bf16, bf16, source)


# (regex searched in device_kind, case-insensitive; first match wins) -> peak per JAX device.
# NVIDIA datasheets print sparse figures with an asterisk; these are the dense ones (about half).
PEAKS: tuple[tuple[str, DevicePeak], ...] = (
    # TPU v2/v3: JAX exposes each of a chip's 2 TensorCores as a device, so half the chip peak.
    (r"^TPU v2$", _tpu("TPU v2 (one core)", 22.5e12, "cloud.google.com/tpu/docs/v2: 45 TF/chip")),
    (r"^TPU v3$", _tpu("TPU v3 (one core)", 61.5e12,
                       "cloud.google.com/tpu/docs/v3: 123 TF/chip")),
    # From v4 on, the chip's TensorCores form one device (megacore); v5e/v6e have one core.
    (r"^TPU v4$", _tpu("TPU v4", 275e12, "cloud.google.com/tpu/docs/v4: 275 TF bf16/chip")),
    (r"^TPU v5 ?(lite|e)$", _tpu("TPU v5e", 197e12,
                                 "cloud.google.com/tpu/docs/v5e: 197 TF bf16/chip")),
    (r"^TPU v5p?$", _tpu("TPU v5p", 459e12, "cloud.google.com/tpu/docs/v5p: 459 TF bf16/chip")),
    (r"^TPU v6 ?(lite|e)$", _tpu("TPU v6e (Trillium)", 918e12,
                                 "cloud.google.com/tpu/docs/v6e: 918 TF bf16/chip")),
    # NVIDIA: bf16 and TF32 dense tensor-core peaks from the product datasheets.
    (r"\bA100\b", DevicePeak("A100", 312e12, 156e12, "NVIDIA A100 datasheet (SXM and PCIe)")),
    (r"\bA10\b", DevicePeak("A10", 125e12, 62.5e12, "NVIDIA A10 datasheet")),
    (r"\bL4\b", DevicePeak("L4", 121e12, 60e12, "NVIDIA L4 datasheet")),
    (r"\bL40S\b", DevicePeak("L40S", 362e12, 183e12, "NVIDIA L40S datasheet")),
    (r"\bH100\b.*\bPCIe\b", DevicePeak("H100 PCIe", 756.5e12, 378e12, "NVIDIA H100 datasheet")),
    (r"\bH100\b.*\bNVL\b", DevicePeak("H100 NVL", 835.5e12, 417.5e12, "NVIDIA H100 datasheet")),
    (r"\bH100\b", DevicePeak("H100 SXM", 989.5e12, 494.5e12,
                             "NVIDIA H100 datasheet (SXM; PCIe/NVL named in device_kind)")),
    (r"\bGH200\b", DevicePeak("GH200", 989.5e12, 494.5e12, "NVIDIA GH200 datasheet")),
    (r"\bH200\b.*\bNVL\b", DevicePeak("H200 NVL", 835.5e12, 417.5e12, "NVIDIA H200 datasheet")),
    (r"\bH200\b", DevicePeak("H200 SXM", 989.5e12, 494.5e12, "NVIDIA H200 datasheet (SXM)")),
    (r"\bB200\b", DevicePeak("B200", 2.25e15, 1.1e15, "NVIDIA HGX B200 datasheet, per GPU")),
)


def _canonical_dtype(dtype: str) -> str:
    try:
        return _DTYPE_ALIASES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} has no peak figure; use one of "
                         f"{sorted(_DTYPE_ALIASES)}") from None


def lookup_peak(device_kind: str) -> DevicePeak | None:
    """The table entry for a `jax.Device.device_kind` string, or None if it is not listed."""
    for pattern, peak in PEAKS:
        if re.search(pattern, device_kind.strip(), flags=re.IGNORECASE):
            return peak
    return None


def _matmul_size(platform: str) -> int:
    # Big enough to be compute-bound: a few hundred ms on a laptop CPU, ~1 ms on an H100.
    return 2048 if platform == "cpu" else 8192


@functools.cache
def _measure_peak(platform: str, device_kind: str, dtype: str) -> float:
    """Best-of-3 FLOP/s of a jitted square matmul; cached per process, platform, kind and dtype.

    Runs on the first local device of that kind: all devices of one kind are the same hardware
    (emulated CPU devices share the same cores), so one measurement serves them all.
    """
    device = next(d for d in jax.local_devices(backend=platform) if d.device_kind == device_kind)
    n = _matmul_size(platform)
    a_NxN = jax.device_put(jnp.ones((n, n), dtype), device)
    b_NxN = jax.device_put(jnp.full((n, n), 0.5, dtype), device)
    # DEFAULT precision: float32 on NVIDIA runs as TF32, matching the table's float32 column.
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.DEFAULT))
    matmul(a_NxN, b_NxN).block_until_ready()  # compile and warm up
    # Best of several: other work on a busy machine only ever makes a run slower, so the
    # fastest one is the closest to the peak (at least 5 runs and 0.5 s).
    best_s, runs, start = float("inf"), 0, time.perf_counter()
    while runs < 5 or (time.perf_counter() - start < 0.5 and runs < 50):
        t0 = time.perf_counter()
        matmul(a_NxN, b_NxN).block_until_ready()
        best_s = min(best_s, time.perf_counter() - t0)
        runs += 1
    return 2.0 * n**3 / best_s


def cpu_model() -> str:
    """The host CPU's model name (from /proc/cpuinfo, else platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PEAK_CACHE_FILE = "peak_flops.json"


def _cached_peak(cache_dir: str, key: str, measure: Any) -> float:
    """The best peak measured so far for `key` on this machine: a new measurement is taken each
    process and the cache keeps the highest, so a busy machine never lowers it."""
    path = os.path.join(cache_dir, PEAK_CACHE_FILE)
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    best = max(float(known.get(key, 0.0)), measure())
    if best > float(known.get(key, 0.0)):
        known[key] = best
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(known, f, indent=1)
            os.replace(tmp, path)
        except OSError:
            pass
    return best


def peak_flops_per_device(device: jax.Device | None = None, dtype: str = "bfloat16",
                          override: float | None = None,
                          cache_dir: str | None = None) -> tuple[float, str]:
    """Peak FLOP/s of one device for matmuls in `dtype`, and a note saying where it came from.

    `override` (e.g. the config key `log.peak_flops`) wins when positive. Known accelerators come
    from the table above; anything else is measured. On CPU the measured host figure is divided
    among the process's CPU devices, since emulated devices
    (`--xla_force_host_platform_device_count`) share the same cores: MFU = FLOPs / (time x
    devices x peak per device) then compares against the host's peak.
    """
    if override is not None and override > 0:
        return float(override), "from the override (log.peak_flops)"
    dtype = _canonical_dtype(dtype)
    device = device if device is not None else jax.devices()[0]
    peak = lookup_peak(device.device_kind)
    if peak is not None:
        return getattr(peak, dtype), f"{peak.name} {dtype} dense peak, {peak.source}"
    # On CPU the float32 rate is the reference whatever the dtype: bf16 is no faster there.
    measure_dtype = "float32" if device.platform == "cpu" else dtype
    measure = lambda: _measure_peak(device.platform, device.device_kind, measure_dtype)
    n = _matmul_size(device.platform)
    model = cpu_model() if device.platform == "cpu" else device.device_kind
    if cache_dir:
        key = f"{device.platform}|{device.device_kind}|{model}|{measure_dtype}|{n}"
        flops = _cached_peak(cache_dir, key, measure)
    else:
        flops = measure()
    note = (f"measured: best {n}^3 {measure_dtype} matmul on {model!r}"
            + (f", best so far in {os.path.join(cache_dir, PEAK_CACHE_FILE)}" if cache_dir
               else ""))
    if device.platform == "cpu":
        shared_by = len(jax.local_devices(backend="cpu"))
        if shared_by > 1:
            note += f", {flops / 1e9:.1f} GFLOP/s host peak shared by {shared_by} CPU devices"
            flops /= shared_by
    return flops, note


def mfu(flops_per_step: float, step_time_s: float, num_devices: int,
        peak_per_device: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' combined peak."""
    if step_time_s <= 0 or num_devices <= 0 or peak_per_device <= 0:
        raise ValueError(f"mfu needs positive step_time_s, num_devices and peak_per_device, got "
                         f"{step_time_s}, {num_devices}, {peak_per_device}")
    return flops_per_step / (step_time_s * num_devices * peak_per_device)
