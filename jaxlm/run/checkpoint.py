"""Checkpoints of a run: the train state, the data position, the config and extras, as one step.

Each checkpoint is one orbax step directory, written whole or not at all:

    <directory>/<step>/state/   the train state (orbax StandardSave; each process writes its shards)
    <directory>/<step>/data/    the grain iterator state, one process_<i>-of-<n>.json per process
    <directory>/<step>/config/  the resolved run config (JSON, written by process 0)
    <directory>/<step>/extra/   anything else the run records, e.g. the tokenizer path and hash

orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when every item is complete,
so a run killed mid-save leaves only a temporary directory that `latest_step` never returns (and
the next save of that step replaces). Saves are asynchronous: `save` returns once the arrays are
copied to host memory (so the caller may donate or update the state) and the files are written in
the background; `wait` blocks until they are.

A state restores onto any mesh: `restore` takes the NEW run's abstract state (ShapeDtypeStructs
with shardings) and each process reads only the slices its devices hold.

`Checkpointer` writes (and cleans up) only its own run's directory. Every reader of another
run's checkpoints (`jaxlm.weights.restore`) goes through the read-only functions at the end of
this module, `restore_params`, `read_json_items` and `saved_param_shapes`: they neither create,
write nor tidy anything, so they may read a run while its trainer is still saving.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import sys
import time
import traceback
import warnings
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from jaxlm.run import console
from jaxlm.run.errors import CheckpointError

# The items of one checkpoint step.
STATE, DATA, CONFIG, EXTRA = "state", "data", "config", "extra"
JSON_ITEMS = (CONFIG, EXTRA)

# orbax saves an array held by several replicas (a data-parallel copy of a weight) as one slice
# per replica, each transferred by its own device. Each slice is an eagerly compiled program per
# replica and shape at a process's first save (72 of them for a small model on 8 devices, a
# second of compiling): worth it for large arrays, not for a norm scale. Arrays whose slices
# would be smaller than this are written whole by their first replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
    """orbax's jax.Array handler with MIN_REPLICA_SLICE_BYTES (and orbax's array metadata
    store, kept as it is), without orbax's warning that a handler was replaced."""
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
        array_metadata_store=getattr(ocp.type_handlers.get_type_handler(jax.Array),
                                     "_array_metadata_store", None))
    absl_logger = std_logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(std_logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


_register_array_handler()


def step_name_format() -> Any:
    """Step directories are named by the bare step number; temporary ones are skipped."""
    return ocp.path.step.standard_name_format()


def absolute(directory: str) -> str:
    """Local paths made absolute; URLs (gs://...) kept as they are."""
    return directory if "://" in directory else os.path.abspath(directory)


def _listdir(directory: str) -> list[str]:
    return [p.name for p in epath.Path(directory).iterdir()]


def complete_steps(directory: str) -> list[int]:
    """Steps of the complete (renamed, not temporary) checkpoints in `directory`, ascending."""
    if not epath.Path(directory).is_dir():
        return []
    return sorted(m.step for m in step_name_format().find_all(directory))


def _step_dir(directory: str, step: int) -> str:
    """The directory of the complete checkpoint `step`; a clear error when there is none."""
    steps = complete_steps(directory)
    if step not in steps:
        where = (f"the checkpoint directory {directory} does not exist"
                 if not epath.Path(directory).is_dir() else
                 f"complete checkpoints in {directory}: {steps or 'none'}")
        raise FileNotFoundError(f"no complete checkpoint for step {step} ({where})")
    return str(step_name_format().find_step(directory, step).path)


def _flat(tree: Any) -> dict[str, Any]:
    """Leaves by their '/'-joined path, named the way orbax names them on disk."""
    return ocp.tree.to_flat_dict(tree, sep="/")


class IncompatibleCheckpointError(CheckpointError):
    """A readable checkpoint that does not fit the run (model, optimizer, process count)."""


class DataPositionError(IncompatibleCheckpointError):
    """A readable data iterator position that the run's data pipeline cannot take (its
    `set_state` refused it): the data config changed since the save, not the files."""

    def __init__(self, message: str, *, step: int, path: str, cause: str):
        super().__init__(message, path=path)
        self.step = step
        self.cause = cause


class SaveError(CheckpointError):
    """A checkpoint that could not be written (a full disk, a lost mount); the older ones are
    kept."""


# Error texts of failures that are not the checkpoint's fault: never a reason to move it aside.
_TRANSIENT_MARKS = ("RESOURCE_EXHAUSTED", "out of memory", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                    "Connection", "timed out")


def _transient(e: BaseException) -> bool:
    """True for out-of-memory, network and timeout errors (the files may be fine)."""
    if isinstance(e, (MemoryError, ConnectionError, TimeoutError)):
        return True
    return any(mark.lower() in str(e).lower() for mark in _TRANSIENT_MARKS)


def _missing_state(step_dir: str) -> CheckpointError:
    """The error for a step without readable state metadata, saying which file is missing."""
    state_dir = epath.Path(step_dir) / STATE
    if not state_dir.is_dir():
        return CheckpointError(f"checkpoint {step_dir} has no train state ({STATE}/)",
                               path=step_dir)
    return CheckpointError(f"checkpoint {state_dir} has no readable _METADATA: the save was cut "
                           "short or the file was removed", path=str(state_dir))


def _damaged(step_dir: str, e: BaseException) -> CheckpointError:
    """The one-line error of a checkpoint whose files cannot be read."""
    reason = " ".join(str(e).split())[:300] or type(e).__name__
    step_dir = os.path.normpath(step_dir)
    return CheckpointError(f"checkpoint {os.path.basename(step_dir)} in "
                           f"{os.path.dirname(step_dir)} cannot be read: its files are damaged "
                           f"(cut short or partly deleted): {type(e).__name__}: {reason}",
                           path=step_dir)


def _closed_loop_leftover(exc: BaseException | None, tb: Any) -> bool:
    """True for asyncio's RuntimeError('Event loop is closed') raised where a tensorstore read or
    write, still in flight when orbax's operation failed, finishes on the event loop orbax has
    already closed: the tail of a failure jaxlm reports in one line of its own."""
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    frames = {frame.name for frame in traceback.extract_tb(tb)} if tb is not None else set()
    return not frames or "call_soon_threadsafe" in frames


def _quiet_closed_loop_callbacks() -> None:
    """Keeps the 'Event loop is closed' leftovers of a failed orbax operation off the console.
    tensorstore reports each through sys.excepthook or sys.unraisablehook from its own threads
    (a traceback apiece, ~70 lines after one unreadable checkpoint), possibly before jaxlm has
    caught the failure, so the filter is in place from import on. Every other error still
    prints."""
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
    if getattr(previous_unraisable, "jaxlm_closed_loop", False):
        return

    def unraisable(info: Any) -> None:
        if not _closed_loop_leftover(info.exc_value, info.exc_traceback):
            previous_unraisable(info)

    def excepthook(exc_type: type, exc: BaseException, tb: Any) -> None:
        if not _closed_loop_leftover(exc, tb):
            previous_except(exc_type, exc, tb)

    unraisable.jaxlm_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook, sys.excepthook = unraisable, excepthook


_quiet_closed_loop_callbacks()


def _check_abstract(abstract: Any, what: str) -> None:
    for name, leaf in _flat(abstract).items():
        if getattr(leaf, "sharding", None) is None:
            raise ValueError(f"{what}: leaf {name} has no sharding; pass "
                             "jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves, e.g. from "
                             "jaxlm.run.train_state.state_shardings")


def _check_shapes(stored: Any, abstract: Any, path: str, *, prefix: str = "",
                  subset: bool = False) -> None:
    """Raises naming the parameter when the checkpoint and the model disagree on names or shapes.

    `stored` is the orbax metadata tree of the saved item and `abstract` the tree to restore,
    which lives under `prefix` of the saved tree (e.g. "params" for a params-only restore).
    """
    saved = {name: getattr(leaf, "shape", None) for name, leaf in _flat(stored).items()
             if not prefix or name.startswith(prefix + "/")}
    wanted = {(f"{prefix}/{name}" if prefix else name): leaf.shape
              for name, leaf in _flat(abstract).items()}
    missing = sorted(wanted.keys() - saved.keys())
    if missing:
        raise IncompatibleCheckpointError(f"checkpoint {path} has no {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} entries that the "
                         "model/optimizer expects): it was saved by a different model or "
                         "optimizer")
    unexpected = sorted(saved.keys() - wanted.keys())
    if unexpected and not subset:
        raise IncompatibleCheckpointError(f"checkpoint {path} holds {', '.join(unexpected[:5])}"
                         f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} entries) "
                         "that the model/optimizer does not have: it was saved by a different "
                         "model or optimizer")
    for name in sorted(wanted):
        if saved[name] is not None and tuple(saved[name]) != tuple(wanted[name]):
            raise IncompatibleCheckpointError(f"checkpoint {path}: parameter {name} has shape "
                             f"{tuple(saved[name])} but the model expects {tuple(wanted[name])}")


def json_item(value: Any, what: str) -> dict[str, Any]:
    """A JSON-safe deep copy (so later changes by the caller never reach an async save)."""
    if hasattr(value, "to_json_best_effort"):  # ml_collections.ConfigDict
        return json.loads(value.to_json_best_effort())
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint item {what!r} must be JSON-serialisable: {e}") from None


def _handler_registry(state_handler: type = ocp.handlers.StandardCheckpointHandler,
                      state_args: tuple[type, ...] = (ocp.args.StandardSave,
                                                      ocp.args.StandardRestore)) -> Any:
    """One handler per item, for both save and restore, so restore works before any save."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    items = [(STATE, state_handler(), state_args),
             (DATA, grain.checkpoint.CheckpointHandler(),
              (grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore))]
    items += [(name, ocp.handlers.JsonCheckpointHandler(),
               (ocp.args.JsonSave, ocp.args.JsonRestore)) for name in JSON_ITEMS]
    for name, handler, args in items:
        for arg in args:
            registry.add(name, arg, handler)
    return registry


class Checkpointer:
    """Saves and restores the checkpoints of one run under `directory`.

    Every process of a multi-process run must construct it and call `save`, `restore`, `wait`
    and `close` at the same steps (orbax synchronises the processes inside these calls); each
    process saves and restores its own shards and its own data iterator position.

    Retention: the newest `keep_last` checkpoints are kept, plus every checkpoint whose step is a
    multiple of `keep_every` (when > 0), e.g. keep_last=2, keep_every=1000 keeps the two newest
    and steps 1000, 2000, ... An old checkpoint is deleted when a newer save completes.
    """

    def __init__(self, directory: str, *, save_every: int, keep_last: int, keep_every: int = 0,
                 async_save: bool = True, is_primary: bool | None = None):
        """`save_every`: `should_save` is true every this many steps (0: only the final step).

        `is_primary` (default: jax.process_index() == 0, read here rather than at import so
        that jax.distributed can be initialised first) decides which process logs saves.
        """
        if save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {save_every}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if keep_every < 0:
            raise ValueError(f"keep_every must be >= 0, got {keep_every}")
        self.directory = absolute(directory)
        self.save_every = save_every
        self.async_save = async_save
        # The save being written in the background: (step, item names), logged once complete.
        self._in_flight: tuple[int, tuple[str, ...]] | None = None
        self._failed = False  # a save failed (and was reported): closing stays quiet
        # Where restore_newest moved the checkpoints that could not be read, this run.
        self.moved_aside: list[str] = []
        self.is_primary = jax.process_index() == 0 if is_primary is None else is_primary
        policies = ocp.checkpoint_managers
        preserve = policies.LatestN(n=keep_last)
        if keep_every:
            preserve = policies.AnyPreservationPolicy(
                [preserve, policies.EveryNSteps(interval_steps=keep_every)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preserve, enable_async_checkpointing=async_save,
            step_name_format=step_name_format(), cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=_handler_registry())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint on disk (a save still being written does not count).

        Read from the directory, so call it on every process before the first save (at start-up)
        for all processes to agree.
        """
        steps = complete_steps(self.directory)
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return complete_steps(self.directory)

    def should_save(self, step: int, total_steps: int) -> bool:
        """Every `save_every` steps, and always at the final step."""
        return step == total_steps or (self.save_every > 0 and step % self.save_every == 0)

    def save(self, step: int, state: Any, *, data_iterator: Any = None, config: Any = None,
             extra: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Starts writing checkpoint `step`; returns True if it did (False: skipped, logged).

        `state` is a pytree of jax.Arrays (a TrainState); `data_iterator` a grain
        DatasetIterator whose position is the one after the batches consumed so far; `config` a
        ConfigDict or dict; `extra` a JSON-serialisable dict. They are saved as one atomic
        step. Returns when the arrays are on host: the state may then be donated or updated.

        A step that already has a checkpoint is skipped. So is a step older than the newest
        checkpoint, unless `force` (then the older step is written, e.g. after deliberately
        restoring an earlier checkpoint; note the newer one still counts as the latest).
        """
        self._settle()  # the previous save: logged once complete, or its failure raised
        known = self._manager.all_steps()
        if step in known:
            logging.warning("checkpoint for step %d already exists in %s; not saving again",
                            step, self.directory)
            return False
        if known and step < max(known) and not force:
            logging.warning("not saving step %d: %s already holds the newer step %d (pass "
                            "force=True to save it anyway)", step, self.directory, max(known))
            return False
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            if not isinstance(data_iterator, grain.DatasetIterator):
                raise TypeError("data_iterator must be a grain DatasetIterator (with get_state/"
                                f"set_state), got {type(data_iterator).__name__}")
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(json_item(config, CONFIG))
        if extra is not None:
            items[EXTRA] = ocp.args.JsonSave(json_item(extra, EXTRA))
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001  (a write that failed: disk full, lost mount)
            raise self._save_failed(step, e) from e
        if saved:
            self._in_flight = (step, tuple(items))
            if not self.async_save:
                self._settle()
        return bool(saved)

    def poll(self) -> None:
        """Settles the asynchronous save in flight once it has finished: logs
        `checkpoint: step N -> ...` when it is complete on disk, or raises its failure
        (SaveError). Returns at once while it is still being written."""
        if self._in_flight is not None and not self._manager.is_saving_in_progress():
            self._settle()

    def _settle(self) -> None:
        """Waits for the save in flight (if any); logs it complete or raises SaveError."""
        if self._in_flight is None:
            return
        step, names = self._in_flight
        self._in_flight = None
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001  (the background write failed)
            raise self._save_failed(step, e) from e
        if self.is_primary:
            if step not in complete_steps(self.directory):
                raise self._save_failed(step, RuntimeError(
                    f"{step}.orbax-checkpoint-tmp was never renamed to {step}"))
            logging.info("checkpoint: step %d -> %s (%s)", step, self.directory,
                         ", ".join(names))

    def _save_failed(self, step: int, e: BaseException) -> SaveError:
        """The one-line error of a save that failed, naming what is kept."""
        self._failed = True
        console.drop_reraised_tracebacks()  # the save's other threads fail after this line
        # The save's own coroutines, abandoned half-way, would warn at exit.
        warnings.filterwarnings("ignore", message=r"coroutine '\w+\.\w+' was never awaited",
                                category=RuntimeWarning)
        older = [s for s in complete_steps(self.directory) if s != step]
        kept = (f"the newest complete checkpoint is still step {older[-1]}, and a rerun "
                "resumes from it" if older else "no earlier checkpoint exists")
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        return SaveError(f"checkpoint step {step} could not be written to {self.directory} "
                         f"({type(e).__name__}: {reason}); {kept}", path=self.directory)

    def restore(self, step: int, abstract_state: Any, *, data_iterator: Any = None,
                shared_data_position: bool = False) -> Any:
        """The state of checkpoint `step`, laid out as `abstract_state` says.

        `abstract_state`: the pytree to restore, of jax.ShapeDtypeStruct with the NEW run's
        shardings (any mesh). If `data_iterator` is given, its position is set (in place) to the
        one saved by this process (with `shared_data_position`, to any process's: every process
        saved the same). A position file that is missing or not JSON is damage (CheckpointError);
        one the iterator refuses does not fit the data config (DataPositionError).
        """
        step_dir = _step_dir(self.directory, step)
        _check_abstract(abstract_state, "abstract_state")
        state_dir = os.path.join(step_dir, STATE)
        metadata = self._manager.item_metadata(step)[STATE]
        if metadata is None:
            raise _missing_state(step_dir)
        _check_shapes(metadata.tree, abstract_state, state_dir)
        position = None
        if data_iterator is not None:
            position_file = (_any_data_state(step_dir) if shared_data_position
                             else _check_data_state(step_dir))
            position = (position_file, _read_position(position_file))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state)}))
        if position is not None:
            _set_position(data_iterator, step, *position)
        if self.is_primary:
            logging.info("checkpoint: restored step %d from %s", step, step_dir)
        return restored[STATE]

    def restore_newest(self, abstract_state: Any, *, data_iterator: Any = None,
                       shared_data_position: bool = False) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, or None when none does.

        Only a checkpoint whose files are damaged (truncated or missing files, a data position
        that is not JSON) is logged in one line and moved aside to `<directory>.unreadable/`
        (never deleted), and the next older one is tried; when none is left, one warning says
        the run starts over from step 0 (`moved_aside` lists what was moved). A checkpoint
        that does not fit the run (a different model or optimizer, another process count, a
        data position the data config cannot take) is an error: it is fine on disk.
        """
        steps = self.all_steps()
        for i in range(len(steps) - 1, -1, -1):
            step = steps[i]
            try:
                return step, self.restore(step, abstract_state, data_iterator=data_iterator,
                                          shared_data_position=shared_data_position)
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001  (any read failure: the files are broken)
                if _transient(e):  # memory or network trouble says nothing about the files
                    raise
                reason = " ".join(str(e).split())[:300] or type(e).__name__
                then = (f"trying step {steps[i - 1]}" if i else
                        "no older checkpoint is left: the run starts over from step 0")
                self.move_aside(step, f"{type(e).__name__}: {reason}", then=then)
        return None

    def move_aside(self, step: int, reason: str, *, then: str = "") -> str:
        """Moves checkpoint `step` to `<directory>.unreadable/<step>-<time>` and logs why (and
        `then`, what happens next)."""
        source = epath.Path(_step_dir(self.directory, step))
        target_dir = epath.Path(self.directory.rstrip("/") + ".unreadable")
        target = target_dir / f"{step}-{int(time.time())}"
        if self.is_primary:
            target_dir.mkdir(parents=True, exist_ok=True)
            source.rename(target)
            logging.warning("checkpoint step %d cannot be restored (%s); moved it to %s%s",
                            step, reason, target, f"; {then}" if then else "")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxlm_move_aside_{step}")
        self._manager.reload()
        self.moved_aside.append(str(target))
        return str(target)

    def read_json(self, step: int, name: str) -> dict[str, Any]:
        """The `config` or `extra` dict saved with checkpoint `step`."""
        if name not in JSON_ITEMS:
            raise ValueError(f"read_json reads one of {JSON_ITEMS}, got {name!r}")
        step_dir = _step_dir(self.directory, step)
        if not epath.Path(os.path.join(step_dir, name)).is_dir():
            raise FileNotFoundError(f"checkpoint {step_dir} has no {name!r} item (it was saved "
                                    f"without {name}=...)")
        return self._manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.JsonRestore()}))[name]

    def wait(self) -> None:
        """Blocks until the asynchronous save in flight (if any) is complete on disk; raises
        SaveError if it failed."""
        self._settle()

    def close(self, *, raise_errors: bool = True) -> None:
        """Waits for the save in flight (logged, or its failure raised as SaveError; only logged
        with `raise_errors=False`, when another error is on its way out), then releases
        orbax's threads."""
        try:
            self._settle()
        except SaveError as e:
            if raise_errors:
                raise
            logging.warning("%s", e)
        finally:
            # After a failed save orbax re-raises it on every wait: already reported.
            with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
                self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(raise_errors=exc_type is None)


def _any_data_state(step_dir: str) -> str:
    """The saved iterator position of process 0 (or this process's, if it exists)."""
    data_dir = os.path.join(step_dir, DATA)
    own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if epath.Path(own).is_file():
        return own
    files = sorted(f for f in _listdir(data_dir) if f.startswith("process_0-of-")) \
        if epath.Path(data_dir).is_dir() else []
    if not files:
        raise FileNotFoundError(f"checkpoint {step_dir} has no data iterator state ({DATA}/)")
    return os.path.join(data_dir, files[0])


def _check_data_state(step_dir: str) -> str:
    """The file of this process's iterator state (the checkpoint must hold one: the same
    process count)."""
    data_dir = os.path.join(step_dir, DATA)
    if not epath.Path(data_dir).is_dir():
        raise FileNotFoundError(f"checkpoint {step_dir} has no data iterator state ({DATA}/): "
                                "it was saved without data_iterator=...")
    index, count = jax.process_index(), jax.process_count()
    name = f"process_{index}-of-{count}.json"
    if not epath.Path(os.path.join(data_dir, name)).is_file():
        found = sorted(_listdir(data_dir))
        counts = {f.split("-of-")[-1].removesuffix(".json") for f in found if "-of-" in f}
        if counts and str(count) not in counts:
            raise IncompatibleCheckpointError(
                f"checkpoint {data_dir} has no {name}: the data position was saved by "
                f"{'/'.join(sorted(counts))} processes ({found}); resume with that process count")
        raise CheckpointError(f"checkpoint {data_dir} has no {name}: the data position file is "
                              f"missing (found {found or 'nothing'})", path=data_dir)
    return os.path.join(data_dir, name)


def _read_position(path: str) -> Any:
    """The saved iterator position in `path` (grain's JSON); a file that does not parse is
    damaged."""
    text = epath.Path(path).read_text()
    try:
        return json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: the data position is not valid JSON ({e}); "
                              "the file is damaged", path=path) from None


def _set_position(iterator: Any, step: int, path: str, position: Any) -> None:
    """Sets `iterator` to the saved `position` (as grain's checkpoint handler does). The
    iterator refusing it means the pipeline differs from the one that saved it."""
    try:
        iterator.set_state(position)
    except Exception as e:  # noqa: BLE001  (grain raises KeyError, TypeError, ValueError, ...)
        cause = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        raise DataPositionError(f"checkpoint {path}: the saved data position does not fit this "
                                f"run's data pipeline ({cause})", step=step, path=path,
                                cause=cause) from e
    start = getattr(iterator, "start_prefetch", None)
    if start is not None:
        start()


def _state_metadata(mngr: ocp.CheckpointManager, step: int, step_dir: str) -> Any:
    """The orbax metadata of the state item of checkpoint `step` (its tree of shapes); a
    missing or damaged file is a one-line CheckpointError naming the step directory."""
    try:
        metadata = mngr.item_metadata(step)[STATE]
    except Exception as e:  # noqa: BLE001  (the metadata files cannot be read)
        if _transient(e):
            raise
        raise _damaged(step_dir, e) from e
    if metadata is None:
        raise _missing_state(step_dir)
    return metadata


def _step_or_newest(directory: str, step: int | None) -> int:
    """`step`, or the newest complete step of `directory` when it is None."""
    if step is not None:
        return step
    steps = complete_steps(directory)
    if not steps:
        where = ("does not exist" if not epath.Path(directory).is_dir()
                 else "holds no complete checkpoint")
        raise FileNotFoundError(f"cannot read a checkpoint from {directory}: it {where}")
    return steps[-1]


def _params_reader(directory: str) -> ocp.CheckpointManager:
    """A read-only manager of `directory` that restores (parts of) the state as a pytree."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           step_name_format=step_name_format())
    registry = _handler_registry(ocp.handlers.PyTreeCheckpointHandler,
                                 (ocp.args.PyTreeRestore,))
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def restore_params(directory: str, step: int | None, abstract_params: Any, *,
                   subset: bool = False) -> Any:
    """Only the params of checkpoint `step` (None: the latest) in `directory`.

    For a run that starts from an earlier run's weights with a fresh optimizer
    (`config.init_from`). `abstract_params`: jax.ShapeDtypeStruct leaves with the new run's
    shardings. Every process calls it. `subset=True` allows `abstract_params` to name only some
    of the saved params (e.g. one at a time, to bound host memory).
    """
    directory = absolute(directory)
    step = _step_or_newest(directory, step)
    step_dir = _step_dir(directory, step)
    _check_abstract(abstract_params, "abstract_params")
    with _params_reader(directory) as mngr:
        metadata = _state_metadata(mngr, step, step_dir)
        _check_shapes(metadata.tree, abstract_params, os.path.join(step_dir, STATE),
                      prefix="params", subset=subset)
        target = {"params": abstract_params}
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True)}))
        except Exception as e:  # noqa: BLE001  (the arrays' files cannot be read)
            if _transient(e):
                raise
            raise _damaged(step_dir, e) from e
    logging.info("params restored from step %d of %s", step, directory)
    return restored[STATE]["params"]


def read_json_items(directory: str, step: int | None) -> dict[str, dict[str, Any]]:
    """{name: dict} of the `config` and `extra` items that checkpoint `step` (None: the newest)
    in `directory` holds, read as files: no checkpoint manager, nothing written."""
    directory = absolute(directory)
    step_dir = epath.Path(_step_dir(directory, _step_or_newest(directory, step)))
    return {name: json.loads((step_dir / name / "metadata").read_text()) for name in JSON_ITEMS
            if (step_dir / name / "metadata").is_file()}


def saved_param_shapes(directory: str, step: int | None) -> dict[str, tuple[int, ...]]:
    """{'/'-joined name: shape} of the params stored in checkpoint `step` (None: the newest),
    from the checkpoint's metadata (no array is read)."""
    directory = absolute(directory)
    step = _step_or_newest(directory, step)
    with _params_reader(directory) as mngr:
        metadata = _state_metadata(mngr, step, _step_dir(directory, step))
    return {name[len("params/"):]: tuple(getattr(leaf, "shape", ()) or ())
            for name, leaf in _flat(metadata.tree).items() if name.startswith("params/")}
