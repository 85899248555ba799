"""Sharding: the rules table, and a sharded train step equal to the single-device one."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm.parallel import sharding
from tests.model_fixtures import one_pretrain_step, packed_batch

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

MESH_SIZES = ["data", "fsdp", "tensor", "pipeline"]


def test_logical_names_map_through_one_table():
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 2, "pipeline": 1}
    spec = sharding.logical_to_mesh_spec(("embed", "heads", "head_dim"), (32, 4, 8), mesh_shape)
    assert spec == P("fsdp", "tensor", None)
    spec = sharding.logical_to_mesh_spec(("act_batch", "act_length", "act_embed"), (8, 16, 32),
                                         mesh_shape)
    assert spec == P(("data", "fsdp"), None, None)


def test_axes_that_do_not_divide_are_replicated_not_mis_sharded():
    mesh_shape = {"data": 1, "fsdp": 1, "tensor": 4, "pipeline": 1}
    # one kv head (MQA) cannot be split 4 ways: that dimension stays whole
    assert sharding.logical_to_mesh_spec(("embed", "kv_heads", "head_dim"), (32, 1, 8),
                                         mesh_shape) == P(None, None, None)
    # batch 2 over data*fsdp = 2*4: keeps the part that divides
    spec = sharding.logical_to_mesh_spec(("act_batch",), (2,), {"data": 2, "fsdp": 4,
                                                                "tensor": 1, "pipeline": 1})
    assert spec == P("data")


def _boxed(shape, names, dtype=jnp.float32):
    return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, dtype), names)


def _rules_with(**changes):
    return tuple((name, changes.get(name, target)) for name, target in sharding.LOGICAL_AXIS_RULES)


def test_param_axis_that_cannot_apply_is_logged_once_with_name_and_size(caplog):
    sharding._warn_once.cache_clear()
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    tree = {"blocks": {"attn": {
        # one kv head cannot be split 4 ways over tensor: 1024 * 1 * 512 bf16 = 1 MiB replicated
        "wk": _boxed((1024, 1, 512), ("embed", "kv_heads", "head_dim"), jnp.bfloat16),
        "wq": _boxed((1024, 4, 128), ("embed", "heads", "head_dim"))}}}
    with caplog.at_level(logging.WARNING, logger="absl"):
        first = sharding.logical_shardings(tree, mesh)
        second = sharding.logical_shardings(tree, mesh)
    assert first == second
    assert first["blocks"]["attn"]["wk"].spec == P(None, None, None)
    assert first["blocks"]["attn"]["wq"].spec == P(None, "tensor", None)
    # embed -> fsdp of size 1 is silent; only wk's kv_heads is reported, and only once
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    msg = warnings[0]
    assert "blocks/attn/wk" in msg and "(1024, 1, 512)" in msg and "1.00 MiB" in msg
    assert "'kv_heads'" in msg and "'tensor'" in msg
    assert "does not divide dim 1 by mesh size 4" in msg


def test_multi_axis_rule_falls_back_and_a_param_says_which_dimension_took_the_axis(caplog):
    sharding._warn_once.cache_clear()
    rules = _rules_with(mlp=("tensor", "fsdp"))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tree = {"w_out": _boxed((64, 32), ("mlp", "embed"))}
    with caplog.at_level(logging.WARNING, logger="absl"):
        spec = sharding.logical_shardings(tree, mesh, rules)["w_out"].spec
    assert spec == P(("tensor", "fsdp"), None)
    [msg] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "w_out (64, 32)" in msg and "'embed'" in msg and "'fsdp'" in msg
    assert "mesh axis already used by dimension 0 ('mlp')" in msg


def test_activations_fall_back_silently_on_the_projects_multi_axis_batch_rule():
    # the MoE buffer [batch, experts, ...]: the batch takes `expert` first, by design
    mesh_shape = {"data": 2, "fsdp": 1, "tensor": 1, "pipeline": 1, "expert": 4}
    assert sharding.logical_to_mesh_spec(("act_batch", "act_expert", None, "act_embed"),
                                         (8, 4, 3, 32), mesh_shape) == P(("data", "expert"),
                                                                        None, None, None)
    assert sharding.logical_to_mesh_spec(("act_expert", "act_batch", None, "act_embed"),
                                         (4, 8, 3, 32), mesh_shape) == P("expert", "data",
                                                                        None, None)


def test_two_logical_axes_on_one_mesh_axis_is_a_rules_error():
    rules = _rules_with(mlp="fsdp")
    mesh_shape = {"data": 1, "fsdp": 2, "tensor": 2, "pipeline": 1}
    with pytest.raises(ValueError, match=r"logical axes 'embed' \(dimension 0\) and 'mlp' "
                                         r"\(dimension 1\) .* mesh axis 'fsdp'"):
        sharding.logical_to_mesh_spec(("embed", "mlp"), (32, 64), mesh_shape, rules)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match=r"'embed'.*'mlp'.*'fsdp'"):
        sharding.logical_shardings({"w_in": _boxed((32, 64), ("embed", "mlp"))}, mesh, rules)
    # not a collision where only one of them could use the axis: fsdp of size 1, or an odd dim
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (32, 64), {**mesh_shape, "fsdp": 1},
                                         rules) == P(None, None)
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (32, 63), mesh_shape,
                                         rules) == P("fsdp", None)
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (31, 64), mesh_shape,
                                         rules) == P(None, "fsdp")


def test_mesh_sizes_resolve_minus_one_and_reject_bad_products():
    assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2, "pipeline": 1},
                                       8)["data"] == 2
    with pytest.raises(ValueError, match="mesh"):
        sharding.resolve_mesh_shape({"data": 3, "fsdp": 2, "tensor": 1, "pipeline": 1}, 8)
    with pytest.raises(ValueError, match=r"mesh.data: -1 .*mesh.fsdp=3"):
        sharding.resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1, "pipeline": 1}, 8)


@pytest.fixture(scope="module")
def reference():
    batch = packed_batch(8, 16, 250, seed=4)
    single = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1},
                                devices=jax.devices()[:1])
    params, metrics, _ = one_pretrain_step(single, batch)
    return batch, params, metrics


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1)])
def test_sharded_train_step_equals_single_device(reference, shape):
    batch, ref_params, ref_metrics = reference
    mesh = sharding.make_mesh(dict(zip(MESH_SIZES, shape)))
    params, metrics, state = one_pretrain_step(mesh, batch)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params, ref_params)
    # parameters really are distributed the way the rules say
    wq = state.params["blocks"]["attn"]["wq"]
    fsdp, tensor = shape[1], shape[2]
    assert wq.sharding.spec == P(None, "fsdp" if fsdp > 1 else None,
                                 "tensor" if tensor > 1 else None, None)


def test_gradient_accumulation_equals_one_big_batch(reference):
    batch, ref_params, ref_metrics = reference
    single = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1},
                                devices=jax.devices()[:1])
    params, metrics, _ = one_pretrain_step(single, batch, microbatches=4)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params, ref_params)
