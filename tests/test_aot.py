"""The TPU ahead-of-time fit check compiles the real train step, and a stage's other programs
(an RL rollout with its KV cache), for a TPU topology on CPU."""

from __future__ import annotations

import importlib.util

import jax
import pytest

from jaxlm.run import config as config_lib
from jaxlm.scaling import flops as scaling
from jaxlm.tools import aot

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jaxlm[test]' or 'jax[tpu]')")


@pytest.mark.parametrize("name,expected", [
    ("v5p-8", "v5p:2x2x1"), ("v5p-64", "v5p:2x4x4"), ("v5p-128", "v5p:4x4x4"),
    ("v4-32", "v4:2x2x4"), ("v5litepod-16", "v5e:4x4"), ("v5e-8", "v5e:2x4"),
    ("v6e-8", "v6e:2x4"), ("v6e-256", "v6e:16x16"), ("v5p:2x2x2", "v5p:2x2x2")])
def test_accelerator_types_map_to_libtpu_topologies(name, expected):
    assert aot.parse_topology(name)[0] == expected


@pytest.mark.parametrize("name,match", [("v5p-4", "smallest"), ("v5p-7", "even"),
                                        ("v5e-12", "power-of-two"), ("h100-8", "accelerator")])
def test_bad_topologies_are_named(name, match):
    with pytest.raises(ValueError, match=match):
        aot.parse_topology(name)


def _check_fit(config, topology):
    # conftest's global "highest" matmul precision would ask Mosaic for fp32 passes inside the
    # bf16 Splash kernel, which it rejects; training runs at the default precision.
    with jax.default_matmul_precision("default"):
        return aot.check_fit(config, topology)


def _tiny_config(batch: int):
    c = config_lib.base_config()
    c.model.update(d_model=128, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=256,
                   vocab_size=256, compute_dtype="bfloat16")
    c.data.seq_len, c.train.global_batch_size, c.mesh.data = 128, batch, -1
    return c


@needs_libtpu
def test_tiny_config_fits_on_v5p_and_memory_reflects_the_state():
    config = _tiny_config(batch=8)
    report = _check_fit(config, "v5p-8")
    assert report.fits and [p.name for p in report.programs] == ["train step"]
    assert report.num_devices == 4 and report.device_kind == "TPU v5"
    assert report.attention == "splash"  # "auto" resolved for TPU: the Pallas kernel compiled
    assert report.hbm_per_device == 95 * 2**30
    # Pure data parallelism: every device holds the float32 params and two Adam moments.
    params = scaling.count_params(config_lib.model_config(config))["total"]
    train = report.train
    assert not train.compiler_error and train.resident_bytes == 0  # the state is its argument
    assert train.argument_bytes >= 3 * 4 * params
    assert 0 < train.total_bytes < report.hbm_per_device
    assert train.compiled_flops_per_device > 0
    assert "FITS" in aot.format_report(report)


@needs_libtpu
def test_a_sequence_length_splash_has_no_block_for_compiles_with_xla_attention():
    config = _tiny_config(batch=8)
    config.data.seq_len = 64
    report = _check_fit(config, "v5p-8")
    assert report.attention == "xla" and report.fits and not report.train.compiler_error


@needs_libtpu
def test_huge_batch_does_not_fit():
    config = _tiny_config(batch=2**16)
    # A 4-layer d256 model in float32 with plain XLA attention, for which the compiler's
    # out-of-memory verdict comes quickly.
    config.model.update(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=768,
                        compute_dtype="float32", attention="xla")
    report = _check_fit(config, "v5p-8")
    assert not report.fits
    text = aot.format_report(report)
    assert "DOES NOT FIT" in text
    # The biggest activations are named, split over the 4 data-parallel devices.
    name, size, shape = report.largest_intermediates[0]
    assert any(d % 2**16 == 0 for d in shape)
    assert size > 2**30


def _stage_config(batch: int):
    """The tiny config with a wider MLP and vocabulary, so that the weights and their
    optimizer state, not the activations, decide the memory (as in any real model). d_model
    stays 128: libtpu compiles a d_model=256 step ~40% slower, at no gain to the test."""
    c = _tiny_config(batch)
    c.model.update(d_ff=1024, vocab_size=4096)
    return c


@needs_libtpu
def test_every_stage_and_lora_compile_for_v5p_with_what_they_hold():
    """The fit check builds the trainer's program: pair stages carry [B, 2, L] batches, DPO's
    frozen reference is an argument of the step, and LoRA keeps optimizer state for the
    adapters only, so its step needs less memory than full fine-tuning's."""
    reports = {}
    for name, stage, rank in [("sft", "sft", 0), ("reward", "reward", 0), ("dpo", "dpo", 0),
                              ("dpo_lora", "dpo", 8)]:
        c = _stage_config(batch=8)
        c.stage = stage
        c.log.sample_every = 0
        c.model.lora.rank = rank
        if stage == "dpo":
            c.init_from.path = "/sft/checkpoints"  # only read when training
        reports[name] = _check_fit(c, "v5p-8")
        assert reports[name].fits and not reports[name].train.compiler_error, name
    train = {name: r.train for name, r in reports.items()}
    params = scaling.count_params(config_lib.model_config(_stage_config(batch=8)))["total"]
    # Policy, two Adam moments and the frozen reference, float32, on every device.
    assert train["dpo"].argument_bytes >= 4 * 4 * params > train["sft"].argument_bytes
    # LoRA drops the base weights' two moments (adapters and their moments add a little back).
    saved = train["dpo"].argument_bytes - train["dpo_lora"].argument_bytes
    assert saved > 0.8 * 2 * 4 * params
    assert train["dpo_lora"].total_bytes < train["dpo"].total_bytes
    # MFU's count: pairs run two sequences per row, DPO a reference forward on top.
    assert reports["dpo"].model_flops_per_step == pytest.approx(
        reports["sft"].model_flops_per_step * 2 * 4 / 3, rel=1e-9)


@needs_libtpu
def test_grpo_fit_check_compiles_the_rollout_and_counts_its_kv_cache():
    """An RL config's report has the rollout as a row of its own: its temporaries hold the KV
    cache of the B x G rows it decodes (keys and values of every layer over the whole row
    length, in the bf16 training precision), the optimizer state stays resident beside it, and
    the step's model FLOPs add the rollout's to the update's."""
    batch, group = 8, 8
    c = _stage_config(batch=batch)
    c.stage, c.log.sample_every = "grpo", 0
    c.rl.update(group_size=group, max_new_tokens=32, kl_coef=0.0)
    r = _check_fit(c, "v5p-8")
    params = scaling.count_params(config_lib.model_config(_stage_config(batch=batch)))["total"]
    assert r.fits, aot.format_report(r)
    assert [p.name for p in r.programs] == ["train step", "rollout", "eval_rollout"]
    m = c.model
    # keys and values [rows, seq_len, kv_heads, head_dim] per layer, bfloat16
    kv_per_row = 2 * m.num_layers * c.data.seq_len * m.num_kv_heads * (m.d_model // m.num_heads) * 2
    dp = r.num_devices  # mesh.data=-1: the rows are split over every device
    rollout = r.program("rollout")
    # per device; the cache's write index and valid mask add a little
    assert rollout.temporaries["KV cache"] == pytest.approx(
        batch * group * kv_per_row / dp, rel=2e-2)
    assert rollout.temp_bytes >= rollout.temporaries["KV cache"] > 0
    assert rollout.resident_bytes >= 2 * 4 * params  # Adam's two moments, float32
    assert r.model_flops_per_step == pytest.approx(
        r.train.model_flops + rollout.model_flops, rel=1e-12)
    text = aot.format_report(r)
    assert "\n  rollout " in text and "rollout: KV cache" in text
    # The held-out rollout decodes one greedy completion per prompt, whatever the group.
    assert r.program("eval_rollout").temporaries["KV cache"] == pytest.approx(
        batch * kv_per_row / dp, rel=2e-2)
