"""Hugging Face model directory <-> jaxlm checkpoint, one tensor at a time.

`import_hf(hf_dir, out_dir)` writes

    <out_dir>/checkpoints/0/       a jaxlm checkpoint (params only, the resolved run config, and
                                   the tokenizer reference), written by `jaxlm.weights.write`,
                                   that `jaxlm.weights.restore` and `init_from` load
    <out_dir>/config.py            a run config (`get_config`) with this model and
                                   init_from.path = <out_dir>/checkpoints
    <out_dir>/tokenizer.json       the Hugging Face tokenizer (with tokenizer_config.json, its
                                   special tokens and chat template), when the HF directory has
                                   one; else
    <out_dir>/tokenizer.model      the sentencepiece tokenizer, when the HF directory has one

`export_hf(checkpoint_dir, out_dir)` writes config.json + safetensors (sharded above
`max_shard_bytes`) that `transformers.AutoModelForCausalLM.from_pretrained` loads, and the
tokenizer files back. It reads the run through `jaxlm.weights.restore` and so only reads it: a
run can be exported while its trainer is still writing checkpoints.

Memory: import checks every tensor from the safetensors headers, then saves the params as lazy
leaves (`streamed_params`): each group of params is built from its HF tensors (read one at a
time with `safe_open`) only when orbax writes it, and dropped after, so the peak is about one
param group plus one HF tensor, never the output model whole. Export restores one group of
params at a time and produces, writes and frees one HF tensor at a time (peak: about the largest
param). docs/hf.md "Memory" states both bounds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from jaxlm.data import hf_tokenizer
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.models.config import ModelConfig
from jaxlm.models.transformer import Transformer
from jaxlm.run import config as config_lib
from jaxlm.run.errors import ConfigError, DataError, MissingFileError, UserError
from jaxlm.run.train_state import abstract_boxed_params
from jaxlm.weights import restore, write
from jaxlm.weights.hf import config as hf_config
from jaxlm.weights.hf import model_dir, safetensors_io, streamed_params
from jaxlm.weights.hf import tensors as hf_weights

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.py"
TOKENIZER_FILE = "tokenizer.model"
IMPORT_STEP = 0


def run_config(model_fields: dict[str, Any], param_dtype: str, tokenizer_path: str = "",
               tokenizer: Any = None) -> ml_collections.ConfigDict:
    """base_config() with the imported model (and its tokenizer) filled in; validated.
    `tokenizer`: the tokenizer at `tokenizer_path`, when already loaded (from elsewhere)."""
    c = config_lib.base_config()
    for key, value in model_fields.items():
        if isinstance(value, dict):  # a sub-section such as rope_scaling: only the keys given
            for sub, v in value.items():
                c.model[key][sub] = v
        else:
            c.model[key] = value
    c.model.param_dtype = param_dtype
    c.data.tokenizer_path = tokenizer_path
    if tokenizer_path.endswith(".json"):  # a HF tokenizer: its own BOS rule and chat template
        tokenizer = tokenizer or load_tokenizer(tokenizer_path)
        c.data.add_bos = tokenizer.add_bos
        c.data.add_eos = tokenizer.eos_id >= 0
        if tokenizer.chat_template:
            c.chat.template = "tokenizer"
    c.data.seq_len = min(c.data.seq_len, c.model.max_seq_len)
    config_lib.validate(c)
    return c


def abstract_params(cfg: ModelConfig) -> Any:
    """jax.ShapeDtypeStruct leaves of the params of `cfg` (no FLOPs, no memory)."""
    return nn.meta.unbox(abstract_boxed_params(Transformer(cfg), 1))


def _flat(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, (*prefix, key)))
        return out
    return {prefix: tree}


def _nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _tokenizer_files(hf_dir: str) -> dict[str, str]:
    """{file name: path} of the tokenizer of a HF model directory: a Hugging Face tokenizer.json
    with its side files (tokenizer_config.json, chat template, special tokens, generation
    config), else a sentencepiece tokenizer.model; every one confined to the directory. Empty
    when the directory has neither."""
    if model_dir.confined(hf_dir, hf_tokenizer.TOKENIZER_JSON) is not None:
        names: tuple[str, ...] = hf_tokenizer.TOKENIZER_FILES
    else:
        names = (TOKENIZER_FILE,)
    found = {name: model_dir.confined(hf_dir, name) for name in names}
    return {name: path for name, path in found.items() if path is not None}


def _load_tokenizer(hf_dir: str, files: dict[str, str], vocab_size: int) -> tuple[str, Any]:
    """(file name, tokenizer) of the model directory's tokenizer, checked against config.json's
    vocabulary; ("", None) when it has none."""
    if not files:
        logging.warning("%s has neither %s nor %s; the import carries no tokenizer: set "
                        "data.tokenizer_path yourself", hf_dir, hf_tokenizer.TOKENIZER_JSON,
                        TOKENIZER_FILE)
        return "", None
    name = hf_tokenizer.TOKENIZER_JSON if hf_tokenizer.TOKENIZER_JSON in files else \
        TOKENIZER_FILE
    tokenizer = load_tokenizer(files[name])
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"{files[name]} has {tokenizer.vocab_size} ids but config.json "
                        f"vocab_size is {vocab_size}", path=files[name])
    return name, tokenizer


def _read_config_json(hf_dir: str) -> dict[str, Any]:
    path = model_dir.confined(hf_dir, "config.json")
    if path is None:
        raise MissingFileError(f"{hf_dir} has no config.json", path=hf_dir)
    try:
        with open(path) as f:
            hf = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})", path=path) from None
    if not isinstance(hf, dict):
        raise DataError(f"{path}: a JSON object is expected, got {type(hf).__name__}",
                        path=path)
    return hf


def _model_fields(hf: dict[str, Any], num_tensors: int, hf_dir: str) -> dict[str, Any]:
    """`hf_config.model_fields`; a config.json value of the wrong kind (a string where a
    number belongs, ...) that it did not name is reported naming config.json."""
    try:
        return hf_config.model_fields(hf, num_tensors)
    except UserError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise ConfigError(f"{os.path.join(hf_dir, 'config.json')}: a value jaxlm cannot read "
                          f"({type(e).__name__}: {e})") from None


def _write_config_file(path: str, c: ml_collections.ConfigDict, fields: dict[str, Any],
                       hf_dir: str) -> None:
    # Everything embedded is escaped: the docstring holds the directory only as a repr with
    # its quotes and backslashes escaped, so no directory name can end the string.
    where = repr(hf_dir).replace("\\", "\\\\").replace('"', '\\"')
    lines = [f'"""The model imported from {where} by jaxlm/tools/convert_hf.py.',
             "",
             "Starts a run from the imported weights (init_from); set data.* and train.* for",
             'the run, e.g. --config.data.paths=... on the command line."""',
             "",
             "from jaxlm.run.config import base_config",
             "",
             "",
             "def get_config(arg=None):",
             "    del arg",
             "    c = base_config()"]
    for key in (*fields, "param_dtype"):  # every architecture key, default or not
        if isinstance(fields.get(key), dict):
            lines += [f"    c.model.{key}.{sub} = {c.model[key][sub]!r}" for sub in c.model[key]]
        else:
            lines.append(f"    c.model.{key} = {c.model[key]!r}")
    if c.data.tokenizer_path:
        lines.append(f"    c.data.tokenizer_path = {c.data.tokenizer_path!r}")
    defaults = config_lib.base_config()
    for section, key in (("data", "add_bos"), ("data", "add_eos"), ("data", "special_tokens"),
                         ("chat", "template")):
        if c[section][key] != defaults[section][key]:
            lines.append(f"    c.{section}.{key} = {c[section][key]!r}")
    if c.data.seq_len != config_lib.base_config().data.seq_len:
        lines.append(f"    c.data.seq_len = {c.data.seq_len!r}")
    lines += [f"    c.init_from.path = {c.init_from.path!r}", "    return c", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def import_hf(hf_dir: str, out_dir: str, *, param_dtype: str = "float32",
              overwrite: bool = False) -> ml_collections.ConfigDict:
    """Converts a HF model directory into a jaxlm checkpoint + config; returns the run config
    (the one saved with the checkpoint, init_from unset).

    Everything is read and checked (config.json against the safetensors headers, the
    tokenizer) before anything is written; `out_dir` is then written through
    `jaxlm.weights.write.output_directory` (new or empty unless `overwrite`, never overlapping
    `hf_dir`), so a failed import leaves no partial output."""
    hf_dir, out_dir = os.path.abspath(hf_dir), os.path.abspath(out_dir)
    write.check_output(out_dir, (hf_dir,), overwrite=overwrite, flag="--out_dir")
    hf = _read_config_json(hf_dir)
    files = safetensors_io.weight_files(hf_dir)
    index = safetensors_io.tensor_index(files)
    fields = _model_fields(hf, len(index), hf_dir)
    tokenizer_files = _tokenizer_files(hf_dir)
    tokenizer_name, tokenizer = _load_tokenizer(hf_dir, tokenizer_files, fields["vocab_size"])
    tokenizer_path = os.path.join(out_dir, tokenizer_name) if tokenizer_name else ""
    c = run_config(fields, param_dtype, tokenizer_path, tokenizer)
    cfg = config_lib.model_config(c)
    sources = _check_tensors(hf_dir, hf["model_type"], cfg, index)
    extra = {"tokenizer_path": tokenizer_path,
             "tokenizer_sha256": tokenizer.sha256 if tokenizer is not None else "",
             "hf_source": hf_dir, "hf_model_type": hf["model_type"]}
    params = _lazy_params(cfg, sources)
    file_config = ml_collections.ConfigDict(c.to_dict())
    file_config.init_from.path = os.path.join(out_dir, CHECKPOINTS)
    with write.output_directory(out_dir, (hf_dir,), overwrite=overwrite,
                                flag="--out_dir") as directory:
        for name, path in tokenizer_files.items():
            shutil.copyfile(path, os.path.join(directory, name))
        streamed_params.save_params(os.path.join(directory, CHECKPOINTS), IMPORT_STEP,
                                    _nest(params), json.loads(c.to_json_best_effort()), extra)
        _write_config_file(os.path.join(directory, CONFIG_FILE), file_config, fields, hf_dir)
    logging.info("imported %s (%s) -> %s", hf_dir, hf["model_type"], out_dir)
    return c


def _check_tensors(hf_dir: str, model_type: str, cfg: ModelConfig,
                   index: list[tuple[str, str, tuple[int, ...], str]]
                   ) -> dict[str, tuple[str, str]]:
    """(file, name in it) of every HF tensor the model needs, by its `tensor_maps` name; from
    the safetensors headers (`index`) alone, so an unknown, missing, misshapen or non-float
    tensor is reported before anything is read or written."""
    maps = {m.name: m for m in hf_weights.tensor_maps(cfg)}
    sources, unknown = {}, []
    for name, path, shape, dtype in index:
        canonical = hf_weights.canonical_name(name, cfg)
        if canonical is None:
            continue
        if canonical not in maps or canonical in sources:
            unknown.append(name)
            continue
        if shape != maps[canonical].shape:
            raise DataError(f"{path}: tensor {name} has shape {shape}, but config.json "
                            f"implies {maps[canonical].shape}", path=path)
        if not safetensors_io.is_float_code(dtype):
            raise DataError(f"{path}: tensor {name} is {dtype}, but a float weight (F32, BF16, "
                            "F16) is expected", path=path)
        sources[canonical] = (path, name)
    if unknown:
        raise DataError(f"{hf_dir}: tensors that a {model_type} model with this config.json "
                        f"does not have: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}",
                        path=hf_dir)
    missing = sorted(set(maps) - set(sources))
    if missing:
        raise DataError(f"{hf_dir}: missing tensors {missing[:8]}"
                        f"{' ...' if len(missing) > 8 else ''}", path=hf_dir)
    return sources


Group = tuple[frozenset[tuple[str, ...]], tuple[hf_weights.TensorMap, ...]]


def param_groups(cfg: ModelConfig) -> list[Group]:
    """The jaxlm params that HF tensors fill together (e.g. GPT-2's q, k, v from c_attn, or
    every layer of a stacked param), each with those tensors; the groups are disjoint."""
    groups: list[Group] = []
    for m in hf_weights.tensor_maps(cfg):
        leaves = frozenset(hf_weights.param_slot(cfg, p, m.layer)[0] for p in m.params)
        joined = [g for g in groups if g[0] & leaves]
        groups = [g for g in groups if not g[0] & leaves]
        groups.append((leaves.union(*(g[0] for g in joined)),
                       (*(mm for g in joined for mm in g[1]), m)))
    return sorted(groups, key=lambda g: sorted(g[0]))


def largest_group_bytes(cfg: ModelConfig) -> int:
    """Bytes of the largest group of params that the import makes at once (its memory bound,
    docs/hf.md "Memory")."""
    abstract = _flat(abstract_params(cfg))
    itemsize = np.dtype(cfg.weight_dtype).itemsize
    return max(sum(int(np.prod(abstract[p].shape, dtype=np.int64)) for p in leaves)
               for leaves, _ in param_groups(cfg)) * itemsize


def _check_covered(cfg: ModelConfig, abstract: dict[tuple[str, ...], Any],
                   groups: list[Group]) -> None:
    """Every jaxlm param (every layer of a stacked one) is filled by some HF tensor."""
    done = {hf_weights.param_slot(cfg, p, m.layer) for _, maps in groups for m in maps
            for p in m.params}
    for path, leaf in abstract.items():
        stacked = cfg.scan_layers and path[0] == "blocks"
        slots = [(path, i) for i in range(leaf.shape[0])] if stacked else [(path, None)]
        missing = [s for s in slots if s not in done]
        if missing:
            raise AssertionError(f"jaxlm param {'/'.join(path)} (layers "
                                 f"{[i for _, i in missing]}) has no HF tensor in the mapping")


class _GroupAssembler:
    """Builds the jaxlm params one group at a time from the HF tensors that fill it.

    Each param is handed out once; the group's arrays go when its last param is handed out (and
    written), and any group still held is dropped before the next one is built."""

    def __init__(self, cfg: ModelConfig, abstract: dict[tuple[str, ...], Any],
                 sources: dict[str, tuple[str, str]], groups: list[Group]):
        self._cfg, self._abstract, self._sources, self._groups = cfg, abstract, sources, groups
        self._dtype = np.dtype(cfg.weight_dtype)
        self._ready: dict[tuple[str, ...], np.ndarray] = {}

    def make(self, path: tuple[str, ...], group: int) -> np.ndarray:
        if path not in self._ready:
            self._ready = {}
            self._ready = self._assemble(*self._groups[group])
        return self._ready.pop(path)

    def _assemble(self, leaves: frozenset[tuple[str, ...]],
                  maps: tuple[hf_weights.TensorMap, ...]) -> dict[tuple[str, ...], np.ndarray]:
        # Zeroed arrays page in as the tensors arrive; vocab padding rows stay 0.
        arrays = {p: np.zeros(self._abstract[p].shape, self._dtype) for p in leaves}
        for m in maps:
            hf_array = safetensors_io.read_tensor(*self._sources[m.name])
            for path, value in zip(m.params, m.to_jaxlm(hf_array)):
                full, index = hf_weights.param_slot(self._cfg, path, m.layer)
                target = arrays[full] if index is None else arrays[full][index]
                target[tuple(slice(0, s) for s in value.shape)] = value  # vocab: the first V
            del hf_array
        return arrays


def _lazy_params(cfg: ModelConfig, sources: dict[str, tuple[str, str]]
                 ) -> dict[tuple[str, ...], streamed_params.LazyParam]:
    """Every jaxlm param as a `LazyParam` that reads its HF tensors when it is written."""
    abstract = _flat(abstract_params(cfg))
    groups = param_groups(cfg)
    _check_covered(cfg, abstract, groups)
    assembler = _GroupAssembler(cfg, abstract, sources, groups)
    return {path: streamed_params.LazyParam(
                abstract[path].shape, np.dtype(cfg.weight_dtype),
                functools.partial(assembler.make, path, g), group=f"{g:06d}")
            for g, (leaves, _) in enumerate(groups) for path in sorted(leaves)}


@contextlib.contextmanager
def _warnings_only() -> Iterator[None]:
    """absl logs warnings and errors only, for the block (unchanged with --verbosity >= 1)."""
    level = logging.get_verbosity()
    if level >= logging.DEBUG:
        yield
        return
    logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _export_tokenizer_files(saved: restore.SavedRun) -> dict[str, str]:
    """{file name in the export: source path} of the checkpoint's tokenizer: the file it
    recorded, only when it still parses as a tokenizer and has the recorded sha256
    (`restore.saved_tokenizer`), with a Hugging Face tokenizer's side files confined to its
    directory. Empty when the checkpoint records no tokenizer."""
    try:
        tokenizer = restore.saved_tokenizer(saved)
    except FileNotFoundError as e:  # gone since: export the weights, say so
        logging.warning("%s; the export carries no tokenizer", e)
        return {}
    if tokenizer is None:
        return {}
    if not hf_tokenizer.is_hf_tokenizer(tokenizer.path):
        return {TOKENIZER_FILE: tokenizer.path}
    directory = os.path.dirname(os.path.abspath(tokenizer.path))
    files = {hf_tokenizer.TOKENIZER_JSON: tokenizer.path}
    for name in hf_tokenizer.TOKENIZER_FILES:
        if name != hf_tokenizer.TOKENIZER_JSON:
            path = model_dir.confined(directory, name)
            if path is not None:
                files[name] = path
    return files


def _abstract_on_one_device(cfg: ModelConfig) -> dict[tuple[str, ...], Any]:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return {path: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
            for path, x in _flat(abstract_params(cfg)).items()}


def export_hf(checkpoint_dir: str, out_dir: str, *, step: int | None = None,
              dtype: str = "", max_shard_bytes: int = 5 * 2**30,
              overwrite: bool = False) -> list[str]:
    """Writes the jaxlm checkpoint as a HF model directory; returns the weight files written.

    `dtype`: of the HF weights ("" = the checkpoint's param dtype). The HF tensors are written
    grouped by the jaxlm params they come from, and those params are restored one group at a
    time (a stacked `blocks/...` param serves every layer's tensor), so the peak memory is
    about the largest param, not the model.
    """
    saved = restore.read_checkpoint(checkpoint_dir, step)
    write.check_output(out_dir, (checkpoint_dir, *saved.sources), overwrite=overwrite,
                       flag="--out_dir")
    # The model of the saved config, on the vocabulary of the run's tokenizer; a LoRA run's
    # adapters are folded into the weights they adapt as each group is read.
    cfg = restore.model_config(saved, merge_lora=True)
    out_dtype = np.dtype(dtype or cfg.param_dtype)
    safetensors_io.dtype_code(out_dtype)  # fail early on an unsupported dtype
    config = hf_config.hf_config(cfg, torch_dtype=str(out_dtype))
    abstract = _abstract_on_one_device(cfg)
    groups: dict[tuple[tuple[str, ...], ...], list[hf_weights.TensorMap]] = {}
    for m in hf_weights.tensor_maps(cfg):
        leaves = tuple(sorted({hf_weights.param_slot(cfg, p, m.layer)[0] for p in m.params}))
        groups.setdefault(leaves, []).append(m)
    by_name = {m.name: (leaves, m) for leaves, ms in groups.items() for m in ms}
    loaded: dict[tuple[str, ...], np.ndarray] = {}

    def produce(name: str) -> np.ndarray:
        leaves, m = by_name[name]
        if set(loaded) != set(leaves):
            loaded.clear()  # the previous group is written: free it before reading the next
            restored = restore.restore(
                saved.directory, saved.step, model_cfg=cfg,
                abstract_params=_nest({p: abstract[p] for p in leaves}), merge_lora=True,
                subset=True).params
            loaded.update({p: np.asarray(x) for p, x in _flat(restored).items()})
            del restored
        arrays = []
        for path in m.params:
            full, index = hf_weights.param_slot(cfg, path, m.layer)
            arrays.append(loaded[full] if index is None else loaded[full][index])
        return m.to_hf(*arrays).astype(out_dtype, copy=False)

    tokenizer_files = _export_tokenizer_files(saved)
    entries = [(m.name, m.shape) for ms in groups.values() for m in ms]
    with write.output_directory(out_dir, (checkpoint_dir, *saved.sources), overwrite=overwrite,
                                flag="--out_dir") as directory:
        with _warnings_only():  # a restore line per group of params otherwise
            files = safetensors_io.write_model(directory, entries, produce, out_dtype,
                                               max_shard_bytes)
        loaded.clear()
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        for name, source in tokenizer_files.items():
            shutil.copyfile(source, os.path.join(directory, name))
    logging.info("exported step %d of %s (%s) -> %s: %s", saved.step, saved.directory,
                 config["model_type"], out_dir, files)
    return files
