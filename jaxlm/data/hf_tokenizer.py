"""A Hugging Face `tokenizer.json` (BPE, WordPiece, Unigram) behind the interface of
`jaxlm.data.tokenizer.Tokenizer`, with the special tokens and chat template of the directory's
`tokenizer_config.json` (or `chat_template.jinja`).

Ids equal transformers' `tokenizer(text, add_special_tokens=False)`: both run the same
`tokenizers` pipeline. `encode` adds no BOS/EOS; `add_bos` says whether the HF tokenizer's
post-processor would put BOS first (Llama 3 does, Qwen2 and GPT-2 do not), and an import sets
`data.add_bos` from it. The chat template is rendered with Jinja the way transformers'
`apply_chat_template` renders it: a sandboxed environment with trim_blocks and lstrip_blocks,
loop controls, `tojson`, `raise_exception` and `strftime_now`, and the special tokens
(`bos_token`, `eos_token`, ...) as variables.

`tokenizers` and `jinja2` are imported lazily (both ship with transformers).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jaxlm.run.errors import ConfigError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Files of a HF tokenizer directory that an import copies and an export writes back.
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE,
                   "special_tokens_map.json", "generation_config.json")


def is_hf_tokenizer(path: str) -> bool:
    return os.path.basename(path) == TOKENIZER_JSON or path.endswith(".json")


def _content(token: Any) -> str | None:
    """A special token of tokenizer_config.json: a string or a serialised AddedToken."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _chat_template(config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's chat_template (a string, or the "default" of named ones)."""
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


class HFTokenizer:
    """A loaded `tokenizer.json`: encode, decode, special ids, vocabulary size, chat template."""

    def __init__(self, path: str, files: dict[str, bytes] | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        if files is None:
            files = {}
            for name in (TOKENIZER_JSON, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE):
                source = path if name == TOKENIZER_JSON else os.path.join(directory, name)
                if os.path.isfile(source):
                    with open(source, "rb") as f:
                        files[name] = f.read()
        self._files = files
        try:
            self._tok = RustTokenizer.from_str(files[TOKENIZER_JSON].decode())
        except Exception as e:  # tokenizers raises bare Exceptions
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        config = json.loads(files.get(TOKENIZER_CONFIG, b"{}"))
        self.special_token_strings = {key: _content(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        if CHAT_TEMPLATE_FILE in files:
            self.chat_template: str | None = files[CHAT_TEMPLATE_FILE].decode()
        else:
            self.chat_template = _chat_template(config)
        self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
                               if t.special}
        ids_of_a = self._tok.encode("a", add_special_tokens=True).ids
        self.add_bos = bool(ids_of_a) and self.bos_id >= 0 and ids_of_a[0] == self.bos_id

    def _special_id(self, key: str) -> int:
        token = self.special_token_strings.get(key)
        token_id = self._tok.token_to_id(token) if token else None
        return -1 if token_id is None else token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int:
        return self._special_id("eos_token")

    @property
    def unk_id(self) -> int:
        return self._special_id("unk_token")

    @property
    def pad_id(self) -> int:
        """The pad id; tokenizers without one pad with EOS (padding is masked anyway)."""
        pad = self._special_id("pad_token")
        return pad if pad >= 0 else max(self.eos_id, 0)

    @property
    def sha256(self) -> str:
        """Hash of tokenizer.json, tokenizer_config.json and the chat template file."""
        h = hashlib.sha256()
        for name in sorted(self._files):
            h.update(name.encode() + b"\0" + self._files[name] + b"\0")
        return h.hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS; special tokens written in the text are one id."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        del num_threads  # tokenizers parallelises batches itself
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids` (special tokens kept); ids outside the vocabulary are dropped."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        flat = flat[(flat >= 0) & (flat < self.vocab_size)]
        return self._tok.decode(flat.tolist(), skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        token_id = int(token_id)
        return (self._tok.id_to_token(token_id) or "") if 0 <= token_id < self.vocab_size else ""

    def piece_to_id(self, piece: str) -> int:
        token_id = self._tok.token_to_id(piece)
        return self.unk_id if token_id is None else token_id

    def check_fits(self, vocab_size: int, key: str = "model.vocab_size") -> None:
        if self.vocab_size > vocab_size:
            raise ConfigError(f"config key {key}: {vocab_size} is smaller than the "
                             f"{self.vocab_size} ids of tokenizer {self.path}; raise it to at "
                             "least the tokenizer's vocabulary or use a matching tokenizer")

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *,
                            add_generation_prompt: bool = False) -> str:
        """The conversation as text, rendered by the tokenizer's own Jinja chat template."""
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.path} has no chat template "
                             f"({TOKENIZER_CONFIG} chat_template or {CHAT_TEMPLATE_FILE})")
        import jinja2

        variables = {k: v for k, v in self.special_token_strings.items() if v is not None}
        try:
            return _compiled(self.chat_template).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **variables)
        except jinja2.TemplateError as e:  # a syntax error, raise_exception, or the sandbox
            raise ConfigError(f"the chat template of tokenizer {self.path} cannot be rendered "
                              f"({type(e).__name__}: {' '.join(str(e).split())})",
                              key="chat.template") from None

    def __getstate__(self) -> dict:
        return {"path": self.path, "files": self._files}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["files"])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _compiled(template: str) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)
