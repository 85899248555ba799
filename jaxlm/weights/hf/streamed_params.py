"""A params-only jaxlm checkpoint whose arrays are made and written one at a time.

orbax saves a pytree whose leaves already exist, so a converter that assembled every param first
would hold the whole model while it writes. Here each leaf is a `LazyParam` (shape, dtype and a
function that makes the array); the type handler registered for it makes one param, writes it
the way orbax writes a numpy array (its own zarr directory under `state/`, recorded as
`np.ndarray` in the tree metadata), waits for the write and drops it before making the next.
Everything else is orbax's: the step is written into a temporary directory that is renamed only
when every array and the metadata are on disk (a crash leaves no checkpoint that looks complete),
and `jaxlm.weights.restore` (and so `init_from`) reads the result like any other checkpoint.

Peak host memory: one group of params (those made together because they share an input, e.g.
GPT-2's q, k and v from one tensor) plus whatever making them needs, or the param being written
plus tensorstore's compressed copy of it; the heap freed by each write is handed back to the OS
before the next param is made.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from jaxlm.weights import write


@dataclasses.dataclass(frozen=True, eq=False)
class LazyParam:
    """A param that `make()` produces when it is its turn to be written.

    Params with the same `group` are made back to back (in name order), so a maker that builds a
    whole group at once keeps it only until the group's last param is written.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]
    group: str = ""

    @property
    def nbytes(self) -> int:  # orbax sizes a leaf by `nbytes` for its write-rate logs
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class _LazyParamHandler(ocp.type_handlers.NumpyHandler):
    """Writes `LazyParam` leaves one after another as numpy arrays (typestr `np.ndarray`)."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)  # each array is made for the write alone

    async def serialize(self, values: Sequence[LazyParam], infos: Sequence[Any],
                        args: Sequence[ocp.SaveArgs] | None = None) -> list[Any]:
        args = args or [ocp.SaveArgs()] * len(values)
        return [ocp.future.CommitFutureAwaitingContractedSignals(
            self._write_one_by_one(values, infos, args), name="jaxlm_streamed_params")]

    async def _write_one_by_one(self, values: Sequence[LazyParam], infos: Sequence[Any],
                                args: Sequence[ocp.SaveArgs]) -> None:
        order = sorted(range(len(values)), key=lambda i: (values[i].group, infos[i].name))
        for i in order:
            value, info = values[i], infos[i]
            _release_freed_memory()  # what the previous write freed, before the next param
            array = await asyncio.to_thread(value.make)
            if array.shape != tuple(value.shape) or array.dtype != np.dtype(value.dtype):
                raise ValueError(f"param {info.name}: made {array.shape} {array.dtype}, "
                                 f"declared {tuple(value.shape)} {np.dtype(value.dtype)}")
            writes = await super().serialize([array], [info], [args[i]])
            del array  # the write holds its own reference until it completes
            for pending in writes:
                await asyncio.to_thread(pending.result)
            del writes  # a finished write still refers to its array


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none."""
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def _release_freed_memory() -> None:
    """Returns the heap memory freed by the last write to the OS.

    glibc otherwise keeps much of it in its arenas, tensorstore's compressed copies of earlier
    params stay resident while later ones are made, and the RSS keeps climbing (an import of a
    1.2B bfloat16 model peaked at 1.88 GiB instead of 1.26). A no-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _IntendedByThisWriter(logging.Filter):
    """Drops orbax's warnings about what this writer does on purpose: its leaves are not
    jax.Arrays, and it writes without OCDBT."""

    MESSAGES = ("No jax.Array in TypeHandlerRegistry", "Skipping merge of OCDBT checkpoints")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(m in record.getMessage() for m in self.MESSAGES)


def save_params(directory: str, step: int, params: dict[str, Any], config: dict[str, Any],
                extra: dict[str, Any]) -> None:
    """Writes checkpoint `step` under `directory` with `jaxlm.weights.write`, making each
    `LazyParam` of the nested dict `params` only when it is written.

    Without OCDBT (each param is its own zarr array): OCDBT's writer would keep the compressed
    data of every array until its commit, i.e. about the model again."""
    absl_logger, intended = logging.getLogger("absl"), _IntendedByThisWriter()
    absl_logger.addFilter(intended)
    try:
        write.write_params_checkpoint(directory, step, params, config, extra,
                                      type_handlers=[(LazyParam, _LazyParamHandler())],
                                      ocdbt=False)
    finally:
        absl_logger.removeFilter(intended)
