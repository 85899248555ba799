"""What the tools write: the one output-directory guard, and the one params-only checkpoint writer.

`output_directory(target, inputs=..., overwrite=...)` is how every tool that writes a directory
(`jaxlm.tools.quantize`, `jaxlm.tools.merge_lora`, `jaxlm.tools.convert_hf` import and export,
`jaxlm.tools.prepare_data`) gets one. It refuses, in one line and before any work:

- a target that is, holds or lies inside one of the tool's inputs (another run's checkpoints
  are never written into, and `--overwrite` never replaces what is being read);
- a target that exists and is not empty, unless `overwrite` (the flag `--overwrite`).

The tool then writes into a new directory beside the target (`.<name>.partial-...`), renamed
to the target only when everything is written; a replaced target is removed only then. A tool
that fails leaves the target as it was and removes its partial directory (one killed outright
leaves the partial directory, never a half-written target). An object-store target (gs://...)
must be absent or empty and is written in place: orbax renames each step only once it is
complete.

`write_params_checkpoint` writes a params-only checkpoint (`jaxlm.tools.quantize`,
`jaxlm.tools.merge_lora`, the Hugging Face import) into such a directory.

The step is laid out as the trainer's `jaxlm.run.checkpoint.Checkpointer` lays one out, with the
params alone as its state, so `jaxlm.weights.restore` (and `init_from`) read it like any run:

    <directory>/<step>/state/   {"params": ...}
    <directory>/<step>/config/  the run config of the params (JSON)
    <directory>/<step>/extra/   the run's extras (tokenizer path and hash, ...)

orbax writes the step into a temporary directory and renames it once every item is on disk, so
a tool stopped half-way leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging

from jaxlm.run.errors import ConfigError


def _overlaps(a: str, b: str) -> bool:
    """True when the paths `a` and `b` are the same, or one lies inside the other."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _real(path: str) -> str:
    return path if "://" in path else os.path.realpath(path)


def check_output(target: str, inputs: Sequence[str] = (), *, overwrite: bool = False,
                 flag: str = "--out") -> str:
    """The target made absolute, or a ConfigError naming `flag` when it overlaps an input, or
    exists and is not empty without `overwrite` (an object-store target: at all). Empty
    inputs are ignored."""
    from etils import epath

    if not target:
        raise ConfigError(f"{flag} is required")
    remote = "://" in target
    target = target if remote else os.path.abspath(target)
    for source in inputs:
        if source and _overlaps(_real(target), _real(source)):
            raise ConfigError(f"{flag}={target} overlaps the input {source}; write somewhere "
                              "outside it")
    path = epath.Path(target)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag}={target} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and (remote or not overwrite):
        how = "remove it first" if remote else "pass --overwrite to replace it"
        raise ConfigError(f"{flag}={target} exists and is not empty; {how}, or choose "
                          "another directory")
    return target


def _beside(target: str, what: str) -> str:
    """An unused name in the target's directory: `.<name>.<what>-<pid>-<random>`."""
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def output_directory(target: str, inputs: Sequence[str] = (), *, overwrite: bool = False,
                     flag: str = "--out") -> Iterator[str]:
    """Yields an empty directory to write into, checked first by `check_output`.

    A local target: a new directory beside it, which becomes `target` (replacing an existing
    one) when the block succeeds, and is removed when it fails, leaving `target` as it was. An
    object-store target (gs://...), absent or empty, is yielded itself."""
    target = check_output(target, inputs, overwrite=overwrite, flag=flag)
    if "://" in target:
        yield target
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = _beside(target, "partial")
    os.mkdir(tmp)
    try:
        yield tmp
        if os.path.isdir(target) and os.listdir(target):
            old = _beside(target, "replaced")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            if os.path.islink(old):  # a target that was a symlink: only the link goes
                os.unlink(old)
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)  # an empty directory is replaced, an absent one made
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_params_checkpoint(directory: str, step: int, params: Any, config: Any,
                            extra: dict[str, Any], *,
                            type_handlers: Sequence[tuple[type, Any]] = (),
                            ocdbt: bool = True) -> str:
    """Writes checkpoint `step` holding `params` (a pytree of arrays) with the run `config`
    (ConfigDict or dict) and `extra` under `directory`; returns the directory.

    `type_handlers`: (leaf type, orbax TypeHandler) pairs for leaves that are not arrays (the
    import's lazily made params). `ocdbt=False` writes each param as its own zarr array, whose
    data orbax then need not hold until the end of the save. A step that already exists is an
    error, never overwritten."""
    import orbax.checkpoint as ocp

    from jaxlm.run import checkpoint

    directory = checkpoint.absolute(directory)
    handlers = ({"type_handler_registry": ocp.type_handlers.create_type_handler_registry(
        *type_handlers)} if type_handlers else {})
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, **handlers)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(checkpoint.STATE, ocp.args.PyTreeSave, handler)
    for name in checkpoint.JSON_ITEMS:
        registry.add(name, ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler())
    options = ocp.CheckpointManagerOptions(step_name_format=checkpoint.step_name_format(),
                                           create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, options=options, handler_registry=registry) as mngr:
        if step in mngr.all_steps():
            raise FileExistsError(f"{directory} already holds a checkpoint for step {step}")
        mngr.save(step, args=ocp.args.Composite(**{
            checkpoint.STATE: ocp.args.PyTreeSave({"params": params}),
            checkpoint.CONFIG: ocp.args.JsonSave(checkpoint.json_item(config,
                                                                      checkpoint.CONFIG)),
            checkpoint.EXTRA: ocp.args.JsonSave(checkpoint.json_item(extra,
                                                                     checkpoint.EXTRA))}))
    logging.debug("params checkpoint: step %d -> %s", step, directory)
    return directory
