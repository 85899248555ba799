"""Peak FLOP/s table lookup, the measured fallback, and the MFU formula."""

from __future__ import annotations

import dataclasses
import re

import jax
import pytest

from jaxlm.parallel import hardware


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """Stands in for a `jax.Device` of hardware the test machine does not have."""

    device_kind: str
    platform: str = "gpu"
    id: int = 0


@pytest.mark.parametrize("kind, name", [
    ("TPU v4", "TPU v4"),
    ("TPU v5 lite", "TPU v5e"),
    ("TPU v5", "TPU v5p"),
    ("TPU v5p", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e (Trillium)"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA B200", "B200"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA A10", "A10"),
])
def test_device_kind_strings_find_their_product(kind: str, name: str) -> None:
    """The device_kind strings JAX reports map to the right product (first match wins, so a
    PCIe or NVL part must not fall through to the SXM row, nor an A100 to the A10)."""
    peak = hardware.lookup_peak(kind)
    assert peak is not None and peak.name == name
    flops, note = hardware.peak_flops_per_device(FakeDevice(kind), "bfloat16")
    assert flops == peak.bfloat16 and name in note


def test_peak_table_is_consistent_with_its_sources() -> None:
    """Relations the vendor figures obey, so a mistyped entry fails: NVIDIA's dense TF32 peak is
    half its dense bf16 peak; a TPU's float32 matmul is one bf16 pass; a TPU row's figure is the
    one its cited page gives per chip (halved for v2/v3, whose chips are two JAX devices)."""
    for _, peak in hardware.PEAKS:
        if peak.name.startswith("TPU"):
            assert peak.float32 == peak.bfloat16
            per_chip_tf = float(re.search(r"([\d.]+) TF", peak.source).group(1))
            cores = 2 if "(one core)" in peak.name else 1
            assert peak.bfloat16 * cores == pytest.approx(per_chip_tf * 1e12), peak
        else:
            assert peak.float32 == pytest.approx(peak.bfloat16 / 2, rel=0.03), peak  # rounded
            assert "NVIDIA" in peak.source


def test_dtypes() -> None:
    h100 = FakeDevice("NVIDIA H100 80GB HBM3")
    assert hardware.peak_flops_per_device(h100, "float32")[0] == 494.5e12  # TF32
    assert hardware.peak_flops_per_device(h100, "bf16")[0] == 989.5e12
    tpu = FakeDevice("TPU v4", platform="tpu")
    assert hardware.peak_flops_per_device(tpu, "float32")[0] == 275e12  # one bf16 MXU pass
    with pytest.raises(ValueError, match="int4"):
        hardware.peak_flops_per_device(h100, "int4")


@pytest.mark.parametrize("kind", ["NVIDIA A10G", "NVIDIA A100X", "NVIDIA L40",
                                  "TPU v4 lite", "TPU v9000"])
def test_unknown_kinds_are_measured(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hardware.lookup_peak(kind) is None
    calls = []
    monkeypatch.setattr(hardware, "_measure_peak",
                        lambda platform, device_kind, dtype: calls.append(dtype) or 1.5e12)
    flops, note = hardware.peak_flops_per_device(FakeDevice(kind), "bfloat16")
    assert (flops, calls) == (1.5e12, ["bfloat16"]) and note.startswith("measured")


def test_override_wins() -> None:
    flops, note = hardware.peak_flops_per_device(FakeDevice("NVIDIA H100 PCIe"), override=1e12)
    assert flops == 1e12 and "override" in note
    assert hardware.peak_flops_per_device(FakeDevice("NVIDIA H100 PCIe"), override=0.0)[0] == \
        756.5e12


def test_cpu_peak_is_measured_once_and_plausible() -> None:
    cpu = jax.local_devices(backend="cpu")[0]
    assert hardware.lookup_peak(cpu.device_kind) is None
    flops, note = hardware.peak_flops_per_device(cpu, "float32")
    assert 1e8 < flops < 1e14, flops
    assert note.startswith("measured") and "float32" in note
    hits = hardware._measure_peak.cache_info().hits
    # Any CPU device and dtype reuses the one float32 measurement.
    assert hardware.peak_flops_per_device(jax.local_devices(backend="cpu")[-1], "bfloat16") == \
        (flops, note)
    assert hardware._measure_peak.cache_info().hits == hits + 1


def test_mfu() -> None:
    # 1e15 FLOPs per step in 2 s on 4 devices of 250 TFLOP/s: 1e15 / (2 * 4 * 2.5e14) = 0.5.
    assert hardware.mfu(1e15, 2.0, 4, 2.5e14) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="step_time_s"):
        hardware.mfu(1e15, 0.0, 4, 2.5e14)


def test_measured_peak_is_cached_per_cpu_model_keeping_the_best(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([5e9, 3e9, 7e9])  # the second run was on a busy machine
    monkeypatch.setattr(hardware, "_measure_peak", lambda *a: next(readings))
    cpu = jax.local_devices(backend="cpu")[0]
    peaks = [hardware.peak_flops_per_device(cpu, "float32", cache_dir=str(tmp_path))
             for _ in range(3)]
    shared = len(jax.local_devices(backend="cpu"))
    assert [p[0] * shared for p in peaks] == [5e9, 5e9, 7e9]
    assert hardware.cpu_model() in peaks[0][1] and hardware.PEAK_CACHE_FILE in peaks[0][1]


def test_mfu_over_100_percent_says_the_peak_is_suspect() -> None:
    from jaxlm.run.metrics import mfu_text

    assert mfu_text(0.425) == "42.5%"
    assert mfu_text(1.1).startswith("110.0% (") and "suspect" in mfu_text(1.1)
