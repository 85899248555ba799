"""What is evaluated: a checkpoint's params on a mesh, its run config and its text tokenizer.

The tokenizer is the run's sentencepiece model, or, for a checkpoint imported from Hugging Face
without a sentencepiece file, the Hugging Face tokenizer of the imported directory (`hf_source`
in the checkpoint), so harness scores match the source model's own tokenization.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
from etils import epath
from jax.sharding import Mesh

from jaxlm.models import ModelConfig
from jaxlm.weights import restore


class TextTokenizer:
    """encode/decode with the ids evaluation needs, over sentencepiece or Hugging Face.

    `encode(text, special=True)` adds what the model's documents start with: BOS for a
    sentencepiece run trained with data.add_bos, the Hugging Face tokenizer's own special tokens
    otherwise (as the harness's Hugging Face backend does).
    """

    def __init__(self, tokenizer: Any, *, add_bos: bool, name: str):
        self._tok, self.add_bos, self.name = tokenizer, add_bos, name
        self.is_hf = not hasattr(tokenizer, "encode_array")

    @property
    def raw(self) -> Any:
        """The wrapped tokenizer (jaxlm's sentencepiece `Tokenizer` or a Hugging Face one)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self._tok) if self.is_hf else self._tok.vocab_size

    def encode(self, text: str, special: bool = True) -> list[int]:
        if self.is_hf:
            return list(self._tok.encode(text, add_special_tokens=special))
        ids = list(self._tok.encode(text))
        return [self.bos_id] + ids if special and self.add_bos and self.bos_id >= 0 else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of `ids`; a Hugging Face tokenizer leaves special tokens out unless asked (as
        the harness's Hugging Face backend decodes generations)."""
        if self.is_hf:
            return self._tok.decode(list(ids), skip_special_tokens=skip_special)
        return self._tok.decode(ids)

    def _hf_id(self, name: str) -> int:
        value = getattr(self._tok, name, None)
        return -1 if value is None else int(value)

    @property
    def bos_id(self) -> int:
        return self._hf_id("bos_token_id") if self.is_hf else self._tok.bos_id

    @property
    def eos_id(self) -> int:
        return self._hf_id("eos_token_id") if self.is_hf else self._tok.eos_id

    @property
    def pad_id(self) -> int:
        if self.is_hf:
            pad = self._hf_id("pad_token_id")
            return pad if pad >= 0 else max(self.eos_id, 0)
        return self._tok.pad_id

    @property
    def prefix_id(self) -> int:
        """The token an empty context (or a rolling window's start) is conditioned on."""
        return self.bos_id if self.bos_id >= 0 else self.eos_id


@dataclasses.dataclass
class Target:
    """A model to evaluate: params (sharded over `mesh`), configs, tokenizer, and where from."""

    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    params: Any
    tokenizer: TextTokenizer
    mesh: Mesh
    step: int
    directory: str = ""


def _tokenizer(saved: restore.SavedRun, hf_tokenizer: str) -> TextTokenizer:
    config, extra = saved.run_config(), saved.extra
    add_bos = bool(config.data.add_bos)
    hf_dir = hf_tokenizer or ""
    path = extra.get("tokenizer_path") or config.data.tokenizer_path
    if not hf_dir and path.endswith(".json") and os.path.isdir(os.path.dirname(path)):
        # An imported checkpoint's tokenizer.json (with its tokenizer_config.json beside it):
        # evaluated through transformers' own tokenizer, as the harness's HF backend is.
        hf_dir = os.path.dirname(path)
    if not hf_dir and path and epath.Path(path).exists():
        return TextTokenizer(restore.saved_tokenizer(saved), add_bos=add_bos, name=path)
    hf_dir = hf_dir or extra.get("hf_source", "")
    if not hf_dir or not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"the checkpoint's tokenizer {path!r} does not exist and it "
                                "names no Hugging Face directory; pass --hf_tokenizer=DIR")
    from transformers import AutoTokenizer  # only for imported checkpoints

    return TextTokenizer(AutoTokenizer.from_pretrained(hf_dir, local_files_only=True),
                         add_bos=add_bos, name=hf_dir)


def load_target(workdir: str, step: int | None = None, mesh: Mesh | None = None,
                hf_tokenizer: str = "") -> Target:
    """The newest (or `step`) checkpoint of a run or an imported model, params over `mesh`."""
    saved = restore.read_checkpoint(workdir, step)
    tokenizer = _tokenizer(saved, hf_tokenizer)
    model_cfg = restore.model_config(saved, tokenizer.vocab_size)
    r = restore.restore(saved.directory, saved.step, mesh, model_cfg=model_cfg)
    return Target(saved.run_config(), model_cfg, r.params, tokenizer, r.mesh, r.step,
                  r.directory)
