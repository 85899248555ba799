"""Restoring a model from a checkpoint: its model config, params and tokenizer, read-only.

Every reader of a saved run comes through here: `init_from` (a LoRA run's adapters merged),
the frozen models of a stage (a distillation teacher), the reward model of PPO and rejection
sampling, `jaxlm.tools.generate`, `jaxlm.tools.eval`, `jaxlm.tools.quantize`,
`jaxlm.tools.merge_lora` and the Hugging Face export.

    r = restore("/tmp/jaxlm_tiny")      # a run's workdir, or a directory of step checkpoints
    r.model_cfg, r.params, r.tokenizer, r.config, r.step

- Read-only: the run's directory is read with `jaxlm.run.checkpoint`'s read-only functions and
  never created, written or tidied, so a run can be read while its trainer is still saving.
- The model is the one the checkpoint's saved run config describes: its own width and depth, the
  scalar head of a reward stage, on the vocabulary of the run's tokenizer where the config left
  model.vocab_size at 0.
- The tokenizer is the one the run recorded, refused when its file changed since (sha256). A
  caller that brings its own (a run reading its teacher's checkpoint) has it checked against the
  record instead.
- The params go straight into the requested shardings (by default the inference layout on
  `mesh`, or on every device along the data axis); each process reads only its own slices.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.data.tokenizer import Tokenizer, load_tokenizer
from jaxlm.models import ModelConfig, Transformer, lora
from jaxlm.models.quant.qarray import is_qarray
from jaxlm.parallel import sharding
from jaxlm.run import checkpoint
from jaxlm.run import config as config_lib
from jaxlm.run.errors import CheckpointError, ConfigError, UserError
from jaxlm.run.train_state import abstract_boxed_params

# The checkpoints directory of a run's workdir.
CHECKPOINTS = "checkpoints"


def checkpoint_directory(path: str) -> str:
    """The directory of step checkpoints that `path` names: `<path>/checkpoints` for a run's
    workdir, else `path` itself (local paths made absolute)."""
    path = checkpoint.absolute(path)
    nested = path.rstrip("/") + "/" + CHECKPOINTS
    return nested if epath.Path(nested).is_dir() else path


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """What checkpoint `step` in `directory` records beside its arrays."""

    directory: str
    step: int
    config: ml_collections.ConfigDict | None  # the run config; None when saved without one
    extra: dict[str, Any]  # tokenizer_path, tokenizer_sha256, ...

    def run_config(self) -> ml_collections.ConfigDict:
        """A copy of the saved run config; raises when the checkpoint has none."""
        if self.config is None:
            raise FileNotFoundError(f"checkpoint {self.step} in {self.directory} has no saved "
                                    "config, so its model is unknown")
        return ml_collections.ConfigDict(self.config.to_dict())

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """{'/'-joined name: shape} of the saved params (from the metadata; no array read)."""
        return checkpoint.saved_param_shapes(self.directory, self.step)

    @property
    def has_lora(self) -> bool:
        return self.config is not None and bool(self.config.model.lora.rank)

    @property
    def sources(self) -> tuple[str, ...]:
        """What a model made from this checkpoint still reads: its checkpoint directory and its
        tokenizer file (a tool's output may overlap neither)."""
        tokenizer = self.extra.get("tokenizer_path", "")
        return (self.directory, tokenizer) if tokenizer else (self.directory,)


def read_checkpoint(path: str, step: int | None = None) -> SavedRun:
    """The saved run config and extras of the newest (or `step`) complete checkpoint of a run's
    workdir or of a checkpoint directory; no array is read, nothing is written."""
    directory = checkpoint_directory(path)
    steps = checkpoint.complete_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint under {path}")
    step = steps[-1] if step is None else step
    items = checkpoint.read_json_items(directory, step)
    config = items.get(checkpoint.CONFIG)
    return SavedRun(directory, step,
                    None if config is None else ml_collections.ConfigDict(config),
                    items.get(checkpoint.EXTRA, {}))


def saved_tokenizer(saved: SavedRun) -> Tokenizer | None:
    """The tokenizer the checkpoint's run used (its recorded path, else its data.tokenizer_path),
    refused when the file changed since the checkpoint (sha256); None when it records none."""
    path = saved.extra.get("tokenizer_path", "")
    if not path and saved.config is not None:
        path = saved.config.get("data", {}).get("tokenizer_path", "")
    if not path:
        return None
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"the tokenizer {path!r} of checkpoint {saved.step} in "
                                f"{saved.directory} does not exist; copy it back or re-run "
                                "training's tokenizer step")
    tokenizer = load_tokenizer(path)
    want = saved.extra.get("tokenizer_sha256")
    if want and tokenizer.sha256 != want:
        raise CheckpointError(f"tokenizer {path} has changed since checkpoint {saved.step} in "
                         f"{saved.directory} was written (sha256 {tokenizer.sha256[:12]} != "
                         f"{want[:12]})", path=path)
    return tokenizer


def check_tokenizer(saved: SavedRun, tokenizer: Any) -> None:
    """Raises unless the checkpoint's run used `tokenizer` (the same sha256, or the same path
    where either has no hash); a checkpoint that records no tokenizer is not checked."""
    path = saved.extra.get("tokenizer_path", "")
    sha = saved.extra.get("tokenizer_sha256", "")
    if not path and not sha:
        return
    mine = getattr(tokenizer, "sha256", "")
    same = sha == mine if sha and mine else \
        os.path.abspath(path) == os.path.abspath(getattr(tokenizer, "path", ""))
    if not same:
        raise ConfigError(
            f"config key data.tokenizer_path: checkpoint {saved.directory} (step {saved.step}) "
            f"was trained with tokenizer "
            f"{path!r} (sha256 {sha[:12] or '?'}), this run uses "
            f"{getattr(tokenizer, 'path', '?')!r} (sha256 {mine[:12] or '?'}); they must be "
            "the same tokenizer (set data.tokenizer_path to the checkpoint's, or leave it "
            "empty to use it)")


def source_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer | None:
    """For a run whose data.tokenizer_path is empty: the tokenizer recorded by the checkpoint it
    starts from (init_from.path), else by its stage's frozen models (a teacher). None when none
    records one, or data.tokenizer_path is set."""
    from jaxlm.stages import get_stage

    if config.data.tokenizer_path:
        return None
    sources = [(f"frozen model {name!r}", path, step)
               for name, (path, step) in get_stage(config.stage).frozen_models(config).items()]
    if config.init_from.path:
        step = None if config.init_from.step < 0 else config.init_from.step
        sources.insert(0, ("the init_from run", config.init_from.path, step))
    for what, path, step in sources:
        tokenizer = saved_tokenizer(read_checkpoint(path, step))
        if tokenizer is not None:
            logging.info("tokenizer of %s: %s", what, tokenizer.path)
            return tokenizer
    return None


def _merged_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run config of a LoRA run's params with the adapters folded in (a QLoRA base float)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.model.lora.rank:
        config.model.lora.rank = 0
        if "quant" in config and config.quant.mode == "ptq":
            config.quant.mode = "none"
    return config


def model_config(saved: SavedRun, vocab_size: int | None = None, *, merge_lora: bool = False,
                 language_model: bool = False,
                 like: ml_collections.ConfigDict | None = None) -> ModelConfig:
    """The model of the checkpoint's saved run config, without dropout.

    `vocab_size`: the vocabulary where the saved config leaves model.vocab_size at 0 (default:
    the saved tokenizer's). `merge_lora`: the model of the params with a LoRA run's adapters
    folded in. `language_model`: the plain language model whatever stage trained it (a PPO value
    head left out; a reward model, which has no vocabulary head, refused). `like`: a run config
    whose mesh and train sections replace the saved ones (the model laid out as that run's).
    """
    from jaxlm.stages import get_stage

    config = _merged_config(saved.run_config()) if merge_lora else saved.run_config()
    if language_model:
        if not get_stage(config.stage).vocab_head:
            raise ValueError(f"checkpoint {saved.directory} is a {config.stage} model (no "
                             "vocabulary head), not a language model")
        config.stage = "pretrain"
    if like is not None:
        config.mesh, config.train = like.mesh, like.train
    config.model.lora.dropout = 0.0
    if not config.model.vocab_size and vocab_size is None:
        tokenizer = saved_tokenizer(saved)
        if tokenizer is None:
            raise ValueError(f"checkpoint {saved.directory}: its config leaves "
                             "model.vocab_size at 0 and it records no tokenizer")
        vocab_size = tokenizer.vocab_size
    return config_lib.model_config(config, vocab_size)


def replicated_mesh() -> Mesh:
    """Every device on the data axis: params replicated, batches split."""
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "pipeline": 1})


def inference_abstract(model_cfg: ModelConfig, mesh: Mesh) -> Any:
    """The params of `model_cfg` as ShapeDtypeStructs, sharded over `mesh` by their logical
    axis names (the layout `jaxlm.inference` serves)."""
    from jaxlm.inference.sampler import param_shardings

    shapes = nn.meta.unbox(abstract_boxed_params(Transformer(model_cfg), 1))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, param_shardings(model_cfg, mesh))


def _adapter_abstract(name: str, weight: jax.ShapeDtypeStruct, a_shape: tuple[int, ...],
                      b_shape: tuple[int, ...]) -> tuple[jax.ShapeDtypeStruct, ...]:
    """A [stacked..., in..., r] and B [stacked..., r, out...] of `weight`, sharded as its
    axes are (the rank axis whole)."""
    n_keep = len(a_shape) - 1  # the weight's stacked and input axes
    n_stacked = len(b_shape) - 1 - (len(weight.shape) - n_keep)
    if (tuple(a_shape[:n_keep]) != tuple(weight.shape[:n_keep]) or n_stacked < 0
            or tuple(b_shape[n_stacked + 1:]) != tuple(weight.shape[n_keep:])):
        raise ValueError(f"the checkpoint's adapters of {name} ({a_shape}, {b_shape}) do not "
                         f"fit the model's weight {tuple(weight.shape)} (another architecture)")
    a_sh = b_sh = weight.sharding
    if isinstance(weight.sharding, NamedSharding):
        spec = tuple(weight.sharding.spec)
        spec += (None,) * (len(weight.shape) - len(spec))
        a_sh = NamedSharding(weight.sharding.mesh, PartitionSpec(*spec[:n_keep], None))
        b_sh = NamedSharding(weight.sharding.mesh,
                             PartitionSpec(*spec[:n_stacked], None, *spec[n_keep:]))
    return (jax.ShapeDtypeStruct(a_shape, weight.dtype, sharding=a_sh),
            jax.ShapeDtypeStruct(b_shape, weight.dtype, sharding=b_sh))


def _joined(a: dict, b: dict) -> dict:
    """One nested dict of the leaves of two."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(a),
                                         **traverse_util.flatten_dict(b)})


def _merge_on_device(params: Any, out_shardings: Any, saved: SavedRun) -> Any:
    """`params` (base weights and adapters) with the adapters folded in, W + (alpha / r) A B,
    laid out as `out_shardings`."""
    lora_cfg = saved.run_config().model.lora
    rank, alpha = int(lora_cfg.rank), float(lora_cfg.alpha)
    if rank <= 0:
        raise ValueError(f"checkpoint {saved.directory} holds LoRA adapters but its saved "
                         f"config has model.lora.rank={rank}")
    # The base weights' buffers are handed to the merged ones (a QLoRA base, dequantized,
    # cannot take them); the adapters are dropped.
    base, adapters = lora.split(params)
    quantized = any(map(is_qarray, jax.tree.leaves(base, is_leaf=is_qarray)))
    merge = lambda b, a: lora.merge(_joined(b, a), rank, alpha)  # noqa: E731
    merged = jax.jit(merge, out_shardings=out_shardings,
                     donate_argnums=() if quantized else (0,))(base, adapters)
    logging.info("checkpoint %s: merged its LoRA adapters (rank %d, alpha %g) into the base "
                 "weights", saved.directory, rank, alpha)
    return merged


def _restore_params(saved: SavedRun, abstract_params: Any, subset: bool) -> Any:
    """`checkpoint.restore_params` of the saved step; a failure to read its files (truncated,
    removed, not a checkpoint) is a CheckpointError naming the step."""
    _drop_late_read_reports()  # reads still in flight when one fails report on stderr
    try:
        return checkpoint.restore_params(saved.directory, saved.step, abstract_params,
                                         subset=subset)
    except (UserError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many types)
        time.sleep(_LATE_READS_S)  # their reports land in the filter, not after exit
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"checkpoint {saved.step} in {saved.directory} cannot be read "
                              f"({type(e).__name__}: {reason}); if its files are truncated or "
                              "damaged, choose another step or copy or save it again",
                              path=saved.directory) from e


# Seconds a failed restore waits for the reads still in flight, so that they report (to the
# filter below) before the process goes on or exits (when the filter is gone).
_LATE_READS_S = 1.0
_TRACEBACK = "Traceback (most recent call last):"
# The last line of a traceback: an exception class (capitalised, maybe dotted) and its message.
_EXCEPTION_LINE = re.compile(r"^[A-Z][\w.]*(: |\n|$)")


class _WithoutLateReadReports:
    """A text stream (sys.stderr) that drops the tracebacks of reads finishing after their
    failed restore: orbax closes the restore's event loop when the first read fails, and each
    read still in flight then reports `RuntimeError: Event loop is closed` from
    `call_soon_threadsafe` when it completes (tens of tracebacks after the one-line error).
    Lines are assembled per writing thread (those reports come from several threads at
    once, in fragments); everything else passes through unchanged."""

    def __init__(self, stream: Any):
        self._stream, self._lock = stream, threading.Lock()
        self._pending: dict[int, str] = {}  # thread -> its unfinished line
        self._blocks: dict[int, list[str]] = {}  # thread -> the traceback it is writing

    def write(self, text: str) -> int:
        thread = threading.get_ident()
        with self._lock:
            pending = self._pending.pop(thread, "") + text
            while "\n" in pending:
                line, pending = pending.split("\n", 1)
                self._line(thread, line + "\n")
            if pending and thread not in self._blocks and \
                    not _TRACEBACK.startswith(pending[:len(_TRACEBACK)]):
                self._stream.write(pending)  # a partial line (a progress bar)
                pending = ""
            if pending:
                self._pending[thread] = pending
        return len(text)

    def _line(self, thread: int, line: str) -> None:
        block = self._blocks.get(thread)
        if block is None:
            if line.startswith(_TRACEBACK):
                self._blocks[thread] = [line]
            else:
                self._stream.write(line)
            return
        block.append(line)
        if not line.startswith((" ", "\t", _TRACEBACK)) and _EXCEPTION_LINE.match(line):
            del self._blocks[thread]  # the exception line ends the traceback
            if not (line.startswith("RuntimeError: Event loop is closed")
                    and any("call_soon_threadsafe" in b for b in block)):
                self._stream.write("".join(block))

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _drop_late_read_reports() -> None:
    """Filters sys.stderr through `_WithoutLateReadReports`, once per process."""
    if not isinstance(sys.stderr, _WithoutLateReadReports):
        sys.stderr = _WithoutLateReadReports(sys.stderr)


def read_params(saved: SavedRun, abstract_params: Any, *, merge_lora: bool = False,
                subset: bool = False) -> Any:
    """The saved params named by `abstract_params` (ShapeDtypeStructs with shardings), restored
    into those shardings.

    `merge_lora`: each weight's saved adapters, if any, are read next to it (sharded as its
    axes are) and folded in on device; `abstract_params` names the base weights only.
    `subset`: `abstract_params` may name only some of the saved params (without it, a saved
    param the model lacks is an error)."""
    if merge_lora:
        shapes = saved.param_shapes()
        flat = traverse_util.flatten_dict(abstract_params, sep="/")
        quantized = sorted(n for n in flat if n not in shapes and f"{n}/qvalue" in shapes)
        if quantized:
            raise ValueError(f"checkpoint {saved.directory} holds quantized base weights "
                             f"({quantized[0]}, ...): a QLoRA run; merge its adapters first "
                             "(python -m jaxlm.tools.merge_lora)")
        adapters = {}
        for name, leaf in flat.items():
            a, b = name + lora.SUFFIX_A, name + lora.SUFFIX_B
            if a in shapes and b in shapes:
                adapters[a], adapters[b] = _adapter_abstract(name, leaf, shapes[a], shapes[b])
        if adapters:
            params = _restore_params(
                saved, traverse_util.unflatten_dict({**flat, **adapters}, sep="/"), subset)
            return _merge_on_device(params, jax.tree.map(lambda x: x.sharding, abstract_params),
                                    saved)
    return _restore_params(saved, abstract_params, subset)


@dataclasses.dataclass
class Restored:
    """A model restored from a checkpoint."""

    config: ml_collections.ConfigDict | None  # the saved run config (LoRA off once merged)
    model_cfg: ModelConfig
    params: Any
    tokenizer: Any  # the run's tokenizer (or the caller's); None when neither is known
    step: int
    directory: str  # the directory of step checkpoints
    extra: dict[str, Any]
    mesh: Mesh | None = None  # the mesh of the default layout; None for given shardings


def restore(path: str, step: int | None = None, mesh: Mesh | None = None, *,
            tokenizer: Any = None, model_cfg: ModelConfig | None = None,
            abstract_params: Any = None, merge_lora: bool = False,
            subset: bool = False) -> Restored:
    """The model of the newest (or `step`) complete checkpoint of a run's workdir or a
    checkpoint directory, read-only.

    `tokenizer`: the tokenizer whose ids the caller feeds the model, checked against the one the
    run recorded and giving the vocabulary; by default the run's own is loaded (sha256-checked)
    unless `model_cfg` is given. `model_cfg`: the model to restore (default: `model_config`).
    `abstract_params`: ShapeDtypeStructs with shardings to restore into (default: the model's
    params in the inference layout over `mesh`, or replicated over every device).
    `merge_lora`: a LoRA run's adapters are folded into its base weights (the returned config
    and model have none). `subset`: `abstract_params` may name only some saved params.
    """
    saved = read_checkpoint(path, step)
    if tokenizer is not None:
        check_tokenizer(saved, tokenizer)
    elif model_cfg is None:
        tokenizer = saved_tokenizer(saved)
    vocab_size = tokenizer.vocab_size if tokenizer is not None else None
    if model_cfg is None:
        model_cfg = model_config(saved, vocab_size, merge_lora=merge_lora)
    if abstract_params is not None:
        params = read_params(saved, abstract_params, merge_lora=merge_lora, subset=subset)
    else:
        mesh = mesh or replicated_mesh()
        wanted = inference_abstract(model_cfg, mesh)
        if merge_lora and saved.has_lora:
            # The run's own params (adapters, a QLoRA base quantized), then merged on device.
            own = model_config(saved, model_cfg.vocab_size)
            params = _restore_params(saved, inference_abstract(own, mesh), subset)
            params = _merge_on_device(params, jax.tree.map(lambda x: x.sharding, wanted), saved)
        else:
            params = _restore_params(saved, wanted, subset)
    config = saved.config
    if merge_lora and config is not None:
        config = _merged_config(config)
    return Restored(config, model_cfg, params, tokenizer, saved.step, saved.directory,
                    saved.extra, mesh)
