"""The device mesh, the one table that maps logical axis names to mesh axes, and shardings.

Model code names every parameter dimension and every activation at a block boundary with a
*logical* axis (`embed`, `heads`, `act_batch`, ...). This module alone decides which mesh axes
(`data`, `fsdp`, `tensor`, `pipeline`, `expert`) those names land on:

* parameters are sharded over `fsdp` on their `embed` dimension (ZeRO-3 style) and over `tensor`
  on heads / mlp / vocab (Megatron style);
* activations are sharded over (`data`, `fsdp`, `expert`) on the batch and over `tensor` on
  heads / mlp;
* the stacked blocks' `layers` axis and the pipeline schedule's `stages` axis go over
  `pipeline` (stage s holds layers [s*L/P, (s+1)*L/P); see jaxlm/models/pipeline.py);
* mixture-of-experts weights are sharded over `expert` on their experts dimension; outside the
  MoE blocks the `expert` axis is one more data-parallel axis (docs/moe.md).

A mesh axis that does not divide the dimension it would shard is dropped for that array (the
dimension is replicated instead) so that e.g. one kv head works with tensor=4. For a parameter
(`logical_shardings`) such a dropped axis is logged at WARNING once per parameter and reason,
with the parameter's name, shape and size, since a large weight left replicated costs memory on
every device; activations (`constrain`, traced many times) drop axes silently. Mesh axes of size
1 are never a problem and never logged.

Collisions. A mesh axis shards at most one dimension of an array. When two dimensions name it:
* both rules map to that one mesh axis alone (e.g. `embed` and `mlp` both -> `fsdp` on a weight
  [embed, mlp]) and the later dimension could otherwise take it: the rules table is wrong, and
  `logical_to_mesh_spec` raises ValueError naming both logical axes and the mesh axis;
* either rule lists several mesh axes (`act_batch` -> (data, fsdp, expert)): that rule spreads
  its dimension over whichever of its axes are still free, so the later dimension falls back to
  the rest. This is deliberate: the MoE buffer [batch, experts, ...] shards its batch over
  `expert` too and leaves the experts dimension whole until the all-to-all moves `expert` onto
  it ([experts, batch, ...], where the batch keeps data and fsdp). For a parameter such a
  fallback is logged like an axis that does not divide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.models.quant.qarray import is_qarray
from jaxlm.parallel.settings import MESH_AXES
from jaxlm.run.errors import ConfigError

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated). One entry per name.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", "pipeline"),
    ("norm", None),
    ("positions", None),
    ("expert", "expert"),
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("stages", "pipeline"),
    ("act_expert", "expert"),
)


def _check_rules(rules: Sequence[tuple[str, Any]]) -> None:
    names = [name for name, _ in rules]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"logical axis rules list {sorted(dupes)} more than once")


_check_rules(LOGICAL_AXIS_RULES)


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Replaces one -1 by 'the rest of the devices' and checks the product.

    An axis missing from `sizes` has size 1. Raises ValueError naming the `mesh.*` key when the
    sizes cannot fit `num_devices`.
    """
    sizes = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    unknown = [axis for axis in MESH_AXES if sizes[axis] == -1]
    for axis in MESH_AXES:
        if sizes[axis] == 0 or sizes[axis] < -1:
            raise ConfigError(f"config key mesh.{axis}: size must be positive or -1, got "
                             f"{sizes[axis]}")
    if len(unknown) > 1:
        raise ConfigError(f"config keys mesh.{unknown[0]}, mesh.{unknown[1]}: only one mesh axis "
                         "may be -1 ('the rest of the devices')")
    known = math.prod(sizes[a] for a in MESH_AXES if a not in unknown)
    resolved = dict(sizes)
    if unknown:
        if num_devices % known:
            others = ", ".join(f"mesh.{a}={sizes[a]}" for a in MESH_AXES if a not in unknown)
            raise ConfigError(f"config key mesh.{unknown[0]}: -1 cannot fill {num_devices} devices "
                             f"when the other axes ({others}) multiply to {known}")
        resolved[unknown[0]] = num_devices // known
    product = math.prod(resolved[a] for a in MESH_AXES)
    if product != num_devices:
        shape = ", ".join(f"{a}={resolved[a]}" for a in MESH_AXES)
        raise ConfigError(f"config keys mesh.*: the mesh ({shape}) has {product} devices but "
                         f"{num_devices} are available; set one axis to -1 or fix the sizes")
    return resolved


def make_mesh(sizes: dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor, pipeline, expert) mesh; sizes may contain one -1."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(sizes, len(devices))
    axis_shapes = tuple(shape[a] for a in MESH_AXES)
    return jax.make_mesh(axis_shapes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _mesh_axes_for(logical: str | None, rules: dict[str, Any]) -> tuple[str, ...]:
    if logical is None:
        return ()
    if logical not in rules:
        raise KeyError(f"logical axis {logical!r} has no entry in LOGICAL_AXIS_RULES")
    target = rules[logical]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


@dataclasses.dataclass(frozen=True)
class DroppedAxis:
    """A mesh axis that a dimension's rule names but that does not shard it, and why."""

    dim: int  # index of the array dimension
    logical: str  # its logical axis name
    mesh_axis: str
    reason: str


def _spec_and_dropped(logical_axes: Sequence[str | None], shape: Sequence[int],
                      mesh_shape: dict[str, int], rules: Sequence[tuple[str, Any]]
                      ) -> tuple[P, list[DroppedAxis]]:
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    table = dict(rules)
    owner: dict[str, int] = {}  # mesh axis -> the dimension it shards
    spec, dropped = [], []
    for k, (name, dim) in enumerate(zip(logical_axes, shape)):
        axes = _mesh_axes_for(name, table)
        kept = []
        for axis in axes:
            size = mesh_shape.get(axis, 1)
            if size == 1:
                continue
            divisor = math.prod(mesh_shape[a] for a in kept) * size
            if axis in owner:
                j = owner[axis]
                single = len(axes) == 1 and len(_mesh_axes_for(logical_axes[j], table)) == 1
                if single and dim % divisor == 0:
                    raise ValueError(
                        f"logical axes {logical_axes[j]!r} (dimension {j}) and {name!r} "
                        f"(dimension {k}) of one array {tuple(shape)} both map to mesh axis "
                        f"{axis!r} (size {size}) in the logical axis rules; a mesh axis shards "
                        "one dimension, so map one of them to another mesh axis")
                dropped.append(DroppedAxis(k, name, axis, f"mesh axis already used by "
                                                          f"dimension {j} ({logical_axes[j]!r})"))
            elif dim % divisor:
                dropped.append(DroppedAxis(k, name, axis, f"does not divide dim {dim} by mesh "
                                                          f"size {divisor}"))
            else:
                kept.append(axis)
        owner.update((axis, k) for axis in kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec), dropped


def logical_to_mesh_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                         mesh_shape: dict[str, int],
                         rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> P:
    """Maps logical names of an array of `shape` to a PartitionSpec on a mesh of `mesh_shape`.

    Mesh axes of size 1, axes already used by an earlier dimension through a multi-axis rule,
    and axes that do not divide the dimension are dropped (that dimension is then less sharded,
    never wrongly sharded). Two single-axis rules on one mesh axis raise ValueError (see the
    module docstring).
    """
    return _spec_and_dropped(logical_axes, shape, mesh_shape, rules)[0]


@functools.cache
def _warn_once(name: str, reason: str, message: str) -> None:
    """Logs `message` the first time (parameter name, reason) is seen in this process: the
    shardings of one model are built several times (train state, checkpoints, sampling)."""
    del name, reason  # the cache key
    logging.warning(message)


def _path_name(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _warn_dropped(name: str, value: Any, dropped: Sequence[DroppedAxis]) -> None:
    shape = tuple(value.shape)
    mib = math.prod(shape) * np.dtype(value.dtype).itemsize / 2**20
    for d in dropped:
        _warn_once(name, f"{d.dim}:{d.mesh_axis}:{d.reason}",
                   f"sharding: parameter {name} {shape} ({mib:.2f} MiB) is not split over mesh "
                   f"axis {d.mesh_axis!r} on dimension {d.dim} (logical axis {d.logical!r}): "
                   f"{d.reason}")


def _mesh_shape(mesh: Mesh | jax.sharding.AbstractMesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation, by logical names; a no-op outside `activate`."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    spec = logical_to_mesh_spec(logical_axes, x.shape, _mesh_shape(mesh), rules)
    return jax.lax.with_sharding_constraint(x, spec)


def constrain_leading(x: jax.Array, logical: str) -> jax.Array:
    """Constrains only the leading axis of `x` (by logical name); the others stay as XLA
    propagates them (e.g. a parameter's fsdp/tensor sharding). A no-op outside `activate`."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    lead = logical_to_mesh_spec((logical,), x.shape[:1], _mesh_shape(mesh), rules)[0]
    return jax.lax.with_sharding_constraint(x, P(lead, *[P.UNCONSTRAINED] * (x.ndim - 1)))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Iterator[None]:
    """Makes `mesh` and the rules current while tracing, so `constrain` takes effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_shardings(boxed_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree of (abstract) values boxed in `nn.LogicallyPartitioned`.

    Leaves that carry no logical names are replicated. A mesh axis a parameter's rules name but
    cannot use is logged once (name, shape, MiB, logical and mesh axis, why); a collision in
    the rules raises ValueError.
    """
    mesh_shape = _mesh_shape(mesh)

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        if isinstance(leaf, nn.LogicallyPartitioned) and is_qarray(leaf.value):
            # A quantized weight: values as the float weight, scales by their own shape.
            spec = lambda x: NamedSharding(mesh, _spec_and_dropped(leaf.names, x.shape,
                                                                   mesh_shape, rules)[0])
            return jax.tree.map(spec, leaf.value)
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec, dropped = _spec_and_dropped(leaf.names, leaf.value.shape, mesh_shape, rules)
            if dropped:
                _warn_dropped(_path_name(path), leaf.value, dropped)
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(
        one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a data batch [batch, length, ...]: batch over (data, fsdp, expert)."""
    spec = logical_to_mesh_spec(("act_batch",) + (None,) * (ndim - 1),
                                (data_parallel_size(mesh),) + (1,) * (ndim - 1),
                                _mesh_shape(mesh))
    return NamedSharding(mesh, spec)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the mesh axes `act_batch` maps to."""
    shape = _mesh_shape(mesh)
    axes = _mesh_axes_for("act_batch", dict(LOGICAL_AXIS_RULES))
    return int(np.prod([shape[a] for a in axes]))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded over (data, fsdp, expert).

    Every process passes only its own slice; the same code runs on one host or many.
    """
    return {key: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
            for key, value in local_batch.items()}
