"""Pipeline parallelism: the GPipe and circular schedules, pipelined train steps equal to
unpipelined ones, checkpoints that move between pipeline sizes and repeats, and config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxlm.models import Transformer, pipeline
from jaxlm.parallel import sharding
from jaxlm.run import config as config_lib
from jaxlm.run.checkpoint import Checkpointer
from jaxlm.run.optim import make_optimizer
from jaxlm.run.train_state import init_sharded_state, microbatched_grads
from jaxlm.stages.pretrain import loss_fn
from tests.model_fixtures import LLAMA_TINY, packed_batch

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

SEQ_LEN = 16
CFG = dataclasses.replace(LLAMA_TINY, num_layers=8)
# mesh (data, fsdp, tensor, pipeline), pipeline microbatches, gradient accumulation steps,
# circular repeats
PIPELINED = {
    "p2_data2_tensor2_m4": ((2, 1, 2, 2), 4, 1, 1),
    "p2_repeats2_data2_tensor2_m2_accum2": ((2, 1, 2, 2), 2, 2, 2),
    "p4_repeats2_data2_m4": ((2, 1, 1, 4), 4, 1, 2),
}


def test_gpipe_schedule_equals_the_stages_in_sequence():
    """Every (stages, microbatches) shape, fill and drain included: M < P, M = P, M > P."""
    rng = np.random.default_rng(0)
    for stages, m in [(4, 1), (4, 3), (2, 2), (2, 5)]:
        w_PxDxD = rng.normal(size=(stages, 3, 3)).astype(np.float32)
        x_MxBxD = rng.normal(size=(m, 2, 3)).astype(np.float32)
        side_MxB = rng.normal(size=(m, 2)).astype(np.float32)

        def stage(w_DxD, x_BxD, s_B):
            return jnp.tanh(x_BxD @ w_DxD + s_B[:, None])

        out = pipeline.gpipe(stage, w_PxDxD, x_MxBxD, (side_MxB,), x_axes=("act_batch", None),
                             side_axes=(("act_batch",),))
        want = x_MxBxD
        for s in range(stages):
            want = np.tanh(want @ w_PxDxD[s] + side_MxB[..., None])
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_circular_schedule_runs_the_chunks_in_layer_order():
    """Chunk c = layers [c*K, (c+1)*K) must run on stage c mod P as repeat c // P, for every
    microbatch and in order, also for M < P (the store's spare slots) and K > 1."""
    rng = np.random.default_rng(1)
    for stages, repeats, m, k in [(2, 2, 2, 1), (2, 2, 5, 2), (4, 2, 1, 1), (4, 2, 3, 1),
                                  (4, 3, 4, 1), (3, 2, 7, 1)]:
        layers = stages * repeats * k
        w_LxDxD = rng.normal(size=(layers, 3, 3)).astype(np.float32)
        x_MxBxD = rng.normal(size=(m, 2, 3)).astype(np.float32)
        side_MxB = rng.normal(size=(m, 2)).astype(np.float32)

        def chunk(w_KxDxD, x_BxD, s_B):
            def layer(h_BxD, w_DxD):
                return jnp.tanh(h_BxD @ w_DxD + s_B[:, None]), None
            return jax.lax.scan(layer, x_BxD, w_KxDxD)[0]

        out = pipeline.circular(chunk, pipeline.to_stages(w_LxDxD, stages, repeats), x_MxBxD,
                                (side_MxB,), x_axes=("act_batch", None),
                                side_axes=(("act_batch",),))
        want = x_MxBxD
        for i in range(layers):
            want = np.tanh(want @ w_LxDxD[i] + side_MxB[..., None])
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6,
                                   err_msg=f"P={stages} V={repeats} M={m} K={k}")


@pytest.mark.parametrize("stages,microbatches,repeats",
                         [(4, 4, 1), (4, 1, 1), (2, 4, 2), (4, 4, 2), (4, 8, 3), (4, 2, 2),
                          (3, 7, 2)])
def test_bubble_fraction_counts_the_idle_stage_steps(stages, microbatches, repeats):
    """The formula equals a direct count of idle cells in the schedule table, and the table is
    a valid schedule: every (microbatch, chunk) runs once, on stage chunk mod P, after the
    previous chunk of that microbatch finished (tick-wise) and with the right repeat."""
    table = pipeline.schedule_table(stages, microbatches, repeats)
    assert len(table) == pipeline.num_ticks(stages, microbatches, repeats)
    idle = sum(cell is None for row in table for cell in row)
    assert idle / (len(table) * stages) == pytest.approx(
        pipeline.bubble_fraction(stages, microbatches, repeats))
    ran = {}
    for t, row in enumerate(table):
        for s, cell in enumerate(row):
            if cell is not None:
                mb, r = cell
                assert (mb, r * stages + s) not in ran
                ran[mb, r * stages + s] = t
    assert set(ran) == {(i, c) for i in range(microbatches) for c in range(stages * repeats)}
    for (mb, c), t in ran.items():
        assert c == 0 or ran[mb, c - 1] < t
    if microbatches >= stages or repeats == 1:
        want = (stages - 1) / (repeats * microbatches + stages - 1)
        assert pipeline.bubble_fraction(stages, microbatches, repeats) == pytest.approx(want)
    # `circular` itself scans over exactly those ticks, all P stages working in each (its
    # output equals the layers in order, so P*V*M of those stage-steps are the real ones).
    jaxpr = jax.make_jaxpr(lambda w, x: pipeline.circular(
        lambda w_K, x_B: x_B * w_K.sum(), pipeline.to_stages(w, stages, repeats), x, (),
        x_axes=(None,), side_axes=()))(jnp.ones(stages * repeats), jnp.ones((microbatches, 2)))
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [len(table)]


def test_microbatch_split_is_strided_and_inverts():
    x = np.arange(8 * 3).reshape(8, 3)
    split = pipeline.split_microbatches(x, 4)
    np.testing.assert_array_equal(split[1], x[1::4])
    np.testing.assert_array_equal(pipeline.merge_microbatches(split), x)
    assert pipeline.num_microbatches(8, 4) == 4 and pipeline.num_microbatches(1, 4) == 1


def test_bubble_fraction_formula_and_startup_line():
    assert pipeline.bubble_fraction(1, 8) == 0.0
    assert pipeline.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    c = config_lib.base_config()
    assert config_lib.pipeline_summary(c) is None
    c.mesh.pipeline, c.train.pipeline_microbatches, c.train.global_batch_size = 4, 12, 48
    line = config_lib.pipeline_summary(c)
    assert "4 stages x 1 layers" in line and "12 microbatches of 4 sequences" in line
    assert f"{3 / 15:.3f}" in line and "GPipe" in line
    c.train.pipeline_repeats, c.model.num_layers = 2, 8
    line = config_lib.pipeline_summary(c)
    assert "circular schedule, 2 chunks of 1 layers per stage" in line
    assert f"{3 / 27:.3f}" in line


def _optim():
    # A large eps keeps Adam's first update linear in small gradients (see test_sharding.py).
    return ml_collections.ConfigDict(dict(
        learning_rate=1e-2, warmup_steps=0, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-3,
        weight_decay=0.1, decay_embeddings=False, clip_norm=1.0))


def _one_step(shape, stages, microbatches, accum, repeats=1):
    """Loss, gradients and the state after one optimizer step on `shape`."""
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    model = Transformer(dataclasses.replace(CFG, pipeline_stages=stages,
                                            pipeline_microbatches=microbatches,
                                            pipeline_repeats=repeats))
    tx = make_optimizer(_optim(), 10)
    state, shardings = init_sharded_state(model, tx, mesh, jax.random.key(0), SEQ_LEN)

    def step(state, batch):  # pretrain_step's update, with the gradients returned too
        grads, aux = microbatched_grads(lambda p, b: loss_fn(p, b, model=model), state.params,
                                        batch, accum)
        metrics = {"loss": aux["nll_sum"] / aux["num_tokens"],
                   "grad_norm": optax.global_norm(grads)}
        return state.apply_gradients(grads, tx), metrics, grads

    batch = sharding.global_batch(packed_batch(8, SEQ_LEN, CFG.vocab_size, seed=5), mesh)
    with sharding.activate(mesh):
        compiled = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                           out_shardings=(shardings, sharding.replicated(mesh),
                                          shardings.params)).lower(state, batch).compile()
        new_state, metrics, grads = compiled(state, batch)
    return {"state": new_state, "shardings": shardings, "metrics": jax.device_get(metrics),
            "grads": jax.device_get(grads), "hlo": compiled.as_text()}


@pytest.fixture(scope="module")
def reference():
    return _one_step((8, 1, 1, 1), stages=1, microbatches=1, accum=1)


@pytest.fixture(scope="module")
def pipelined():
    return {name: _one_step(shape, shape[3], m, accum, repeats)
            for name, (shape, m, accum, repeats) in PIPELINED.items()}


def _close(a, b, rtol):
    """Leaf-wise closeness relative to the leaf's own scale (fp32 sums in another order)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(np.max(np.abs(y))))


@pytest.mark.parametrize("name", list(PIPELINED))
def test_pipelined_step_equals_unpipelined(reference, pipelined, name):
    got = pipelined[name]
    shape = PIPELINED[name][0]
    np.testing.assert_allclose(got["metrics"]["loss"], reference["metrics"]["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["metrics"]["grad_norm"], reference["metrics"]["grad_norm"],
                               rtol=1e-5)
    _close(got["grads"], reference["grads"], rtol=1e-5)
    _close(jax.device_get(got["state"].params), jax.device_get(reference["state"].params),
           rtol=1e-5)
    # Storage is the same for every schedule: device s holds layers [s*L/P, (s+1)*L/P) (the
    # stacked layers axis is on `pipeline`), the other axes keep their data/tensor placement;
    # stages hand activations on by collective-permute.
    wq = got["state"].params["blocks"]["attn"]["wq"]
    assert wq.sharding.spec[0] == "pipeline"
    assert wq.sharding.spec[2] == ("tensor" if shape[2] > 1 else None)
    shard = wq.addressable_shards[0]
    assert shard.data.shape[0] == CFG.num_layers // shape[3]
    assert "collective-permute" in got["hlo"]
    assert "collective-permute" not in reference["hlo"]
    # Circular repeats transpose the stored stack across `pipeline` inside the step: by
    # all-to-all / collective-permute of the shards, never by gathering the parameters.
    assert "all-gather" not in got["hlo"]
    assert ("all-to-all" in got["hlo"]) == (PIPELINED[name][3] > 1)


@pytest.mark.parametrize("source,target", [
    ("p2_data2_tensor2_m4", "reference"), ("reference", "p2_data2_tensor2_m4"),
    ("p2_repeats2_data2_tensor2_m2_accum2", "reference"),
    ("p4_repeats2_data2_m4", "p2_data2_tensor2_m4"),
])
def test_checkpoints_restore_across_pipeline_sizes(reference, pipelined, source, target,
                                                   tmp_path):
    runs = {"reference": reference, **pipelined}
    saved, target = runs[source]["state"], runs[target]["shardings"]
    # Circular repeats change only how the step reads the stack, not the state's layout.
    assert (jax.tree.structure(saved) == jax.tree.structure(reference["state"]) and
            [x.shape for x in jax.tree.leaves(saved)]
            == [x.shape for x in jax.tree.leaves(reference["state"])])
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            saved, target)
    with Checkpointer(str(tmp_path), save_every=1, keep_last=1) as ckpt:
        ckpt.save(1, saved)
        ckpt.wait()
        restored = ckpt.restore(1, abstract)
    for got, want, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                             jax.tree.leaves(target)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == sh


def _config(**overrides):
    c = config_lib.base_config()
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        c[section][key] = value
    return c


@pytest.mark.parametrize("overrides,message", [
    ({"mesh__pipeline": 4, "model__num_layers": 6},
     r"config key mesh.pipeline: 4 pipeline stages do not divide model.num_layers=6"),
    ({"mesh__pipeline": 2, "model__scan_layers": False}, "config key model.scan_layers"),
    ({"mesh__pipeline": -1}, "config key mesh.pipeline"),
    ({"train__pipeline_microbatches": 4},
     "config key train.pipeline_microbatches: .*mesh.pipeline > 1"),
    ({"mesh__pipeline": 2, "train__pipeline_microbatches": 0},
     "config key train.pipeline_microbatches"),
    ({"mesh__pipeline": 2, "train__pipeline_microbatches": 2, "train__pipeline_repeats": 0},
     r"config key train.pipeline_repeats: must be >= 1"),
    ({"train__pipeline_repeats": 2}, r"config key train.pipeline_repeats: .*mesh.pipeline > 1"),
    ({"mesh__pipeline": 2, "train__pipeline_microbatches": 2, "model__num_layers": 6,
      "train__pipeline_repeats": 2},
     r"config key train.pipeline_repeats: 2 does not divide the 3 layers of a stage"),
    ({"mesh__pipeline": 4, "train__pipeline_microbatches": 2, "model__num_layers": 8,
      "train__pipeline_repeats": 2},
     r"config key train.pipeline_repeats: .*pipeline_microbatches >= mesh.pipeline, got 2 < 4"),
])
def test_bad_pipeline_configs_name_their_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(_config(**overrides))


def test_microbatches_must_divide_the_per_replica_batch():
    c = _config(mesh__pipeline=2, train__pipeline_microbatches=3, train__global_batch_size=16)
    config_lib.validate(c)
    with pytest.raises(ValueError, match=r"train.pipeline_microbatches: 3 .* batch of one "
                                         r"accumulation step, 4"):
        config_lib.check_devices(c, 8)  # data=4 x pipeline=2: 16 / 4 = 4 rows per replica
    c.train.pipeline_microbatches = 4
    assert config_lib.check_devices(c, 8) == {"data": 4, "fsdp": 1, "tensor": 1, "pipeline": 2,
                                              "expert": 1}
    assert config_lib.model_config(c, 100).pipeline_stages == 2


def test_model_config_rejects_uneven_stages():
    with pytest.raises(ValueError, match="model.num_layers: 8 layers cannot be split evenly"):
        dataclasses.replace(CFG, pipeline_stages=3).check()
    with pytest.raises(ValueError, match="model.pipeline_repeats: 8 layers .* 2 stages x 3"):
        dataclasses.replace(CFG, pipeline_stages=2, pipeline_repeats=3).check()
    c = _config(mesh__pipeline=2, train__pipeline_microbatches=2, train__pipeline_repeats=2)
    config_lib.validate(c)
    assert config_lib.model_config(c, 100).pipeline_repeats == 2
