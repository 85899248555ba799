"""The chat template: conversations -> text, and -> token ids with the mask of trained tokens.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
The default template is ChatML-style; every turn reads

    <|im_start|>{role}\\n{content}<|im_end|>\\n

and a generation prompt is `<|im_start|>assistant\\n`. The two markers are special tokens of the
tokenizer (listed in data.special_tokens when it is trained, see jaxlm/data/tokenizer.py), so
each is exactly one id. The markers and separators are configurable (`chat.*`).

Token-level rendering encodes each piece on its own (marker ids, then the role header, then the
content), so that the ids of a prompt are the same whether or not an answer follows; the
`prompt_ids` of a conversation are a prefix of the ids of that conversation plus its answer.
The loss mask marks the tokens a model should learn to produce: an assistant message's content
and its closing marker (so that it learns to stop), never role headers or other messages
(with `loss_on="all"`, every token after the first).

Importing this module pulls in neither grain nor JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxlm.run.errors import ConfigError
from jaxlm.run.section import Section

ROLES = ("system", "user", "assistant")
LOSS_ON = ("assistant", "all")
CHAT_TEMPLATES = ("chatml", "tokenizer")
Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How a conversation is written out.

    Attributes:
      turn_start: special token that opens a turn (followed by the role name).
      turn_end: special token that closes a turn; the model emits it to end its answer.
      role_separator: text between the role name and the content.
      turn_separator: text after turn_end, before the next turn.
      system_prompt: a system message put first when a conversation has none ("" = none).
      add_bos: token-level rendering starts with the tokenizer's BOS (as pretraining documents
        do).
      from_tokenizer: render with the tokenizer's own Jinja chat template (a Hugging Face
        tokenizer.json's tokenizer_config.json) instead of the fields above; the template
        writes BOS itself.
    """

    turn_start: str = "<|im_start|>"
    turn_end: str = "<|im_end|>"
    role_separator: str = "\n"
    turn_separator: str = "\n"
    system_prompt: str = ""
    add_bos: bool = True
    from_tokenizer: bool = False

    @property
    def special_tokens(self) -> tuple[str, str]:
        return self.turn_start, self.turn_end


CHATML = ChatTemplate()


def default_chat_config() -> ml_collections.ConfigDict:
    """The `chat` section of a run config (the fields of ChatTemplate)."""
    c = ml_collections.ConfigDict()
    # Special token that opens a turn; it must be in data.special_tokens (one id).
    c.turn_start = CHATML.turn_start
    # Special token that closes a turn and ends an answer; also in data.special_tokens.
    c.turn_end = CHATML.turn_end
    # Text between the role name and the message; "\n" may be written as backslash-n.
    c.role_separator = "\\n"
    # Text after a turn's closing token.
    c.turn_separator = "\\n"
    # System message put first when a conversation has none ("" = none).
    c.system_prompt = ""
    # Start each rendered conversation with BOS, like pretraining documents.
    c.add_bos = True
    # "chatml": the markers above; "tokenizer": the Jinja chat template of a Hugging Face
    # tokenizer (data.tokenizer_path = .../tokenizer.json), rendered as transformers does.
    c.template = "chatml"
    return c


def template_from_config(chat: ml_collections.ConfigDict) -> ChatTemplate:
    unescape = lambda s: s.replace("\\n", "\n")
    return ChatTemplate(turn_start=chat.turn_start, turn_end=chat.turn_end,
                        role_separator=unescape(chat.role_separator),
                        turn_separator=unescape(chat.turn_separator),
                        system_prompt=chat.system_prompt, add_bos=chat.add_bos,
                        from_tokenizer=chat.get("template", "chatml") == "tokenizer")


def check_chat_config(chat: ml_collections.ConfigDict, special_tokens: Sequence[str],
                      tokenizer_path: str) -> None:
    """Raises naming `chat.*` / `data.special_tokens` keys; `special_tokens` is data's list."""
    template = chat.get("template", "chatml")
    if template not in CHAT_TEMPLATES:
        raise ConfigError(f"config key chat.template: {template!r} is not one of {CHAT_TEMPLATES}")
    if template == "tokenizer":
        if not tokenizer_path.endswith(".json"):
            raise ConfigError("config key chat.template: 'tokenizer' needs data.tokenizer_path "
                             f"to be a Hugging Face tokenizer.json, got {tokenizer_path!r}")
        return
    for key in ("turn_start", "turn_end"):
        if not chat[key]:
            raise ConfigError(f"config key chat.{key}: must be a special token, e.g. "
                             f"{getattr(CHATML, key)!r}")
        if not tokenizer_path and chat[key] not in special_tokens:
            raise ConfigError(f"config key data.special_tokens: {list(special_tokens)} lacks "
                             f"chat.{key}={chat[key]!r}; the tokenizer needs it as one id")


def check_messages(messages: Any, where: str = "conversation") -> list[Message]:
    """The messages of a conversation, checked; raises ValueError naming `where`."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or \
                not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} must be {{'role': one of {ROLES}, "
                             f"'content': str}}, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _with_system(messages: Sequence[Message], template: ChatTemplate) -> list[Message]:
    messages = list(messages)
    if template.system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": template.system_prompt})
    return messages


def render_messages(messages: list[dict[str, str]], *, add_generation_prompt: bool = False,
                    template: ChatTemplate = CHATML) -> str:
    """The conversation as text; each turn ends with template.turn_end ("<|im_end|>").

    With add_generation_prompt the text ends with the opening of an assistant turn, ready for
    the model to continue. BOS is not part of the text (see `prompt_ids`).
    """
    t = template
    parts = [f"{t.turn_start}{m['role']}{t.role_separator}{m['content']}{t.turn_end}"
             f"{t.turn_separator}" for m in _with_system(messages, t)]
    if add_generation_prompt:
        parts.append(f"{t.turn_start}assistant{t.role_separator}")
    return "".join(parts)


def special_ids(tokenizer: Any, template: ChatTemplate = CHATML) -> tuple[int, int]:
    """(turn_start id, turn_end id); raises if either is not a single id of `tokenizer`."""
    ids = []
    for key, piece in (("turn_start", template.turn_start), ("turn_end", template.turn_end)):
        token_id = tokenizer.piece_to_id(piece)
        if token_id == tokenizer.unk_id or tokenizer.id_to_piece(token_id) != piece:
            raise ConfigError(f"config key data.special_tokens: tokenizer {tokenizer.path} has no "
                             f"id for chat.{key}={piece!r}; train it with that special token")
        ids.append(token_id)
    return ids[0], ids[1]


def render_tokens(tokenizer: Any, messages: Sequence[Message], *,
                  template: ChatTemplate = CHATML, loss_on: str = "assistant",
                  add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N] int32, mask [N] float32) of a conversation.

    mask[i] = 1 where token i is one the model is trained to produce: with loss_on="assistant"
    the content and closing marker of assistant messages; with "all" every token but the first.
    Decoding the ids (without BOS) gives `render_messages(messages)`.
    """
    if loss_on not in LOSS_ON:
        raise ConfigError(f"config key sft.loss_on: {loss_on!r} is not one of {LOSS_ON}")
    if template.from_tokenizer:
        return _render_jinja_tokens(tokenizer, messages, loss_on, add_generation_prompt)
    start_id, end_id = special_ids(tokenizer, template)
    sep = tokenizer.encode(template.turn_separator) if template.turn_separator else []
    ids: list[int] = [tokenizer.bos_id] if template.add_bos else []
    mask: list[float] = [0.0] * len(ids)

    def add(tokens: Sequence[int], trained: bool) -> None:
        ids.extend(tokens)
        mask.extend([1.0 if trained else 0.0] * len(tokens))

    for m in _with_system(messages, template):
        add([start_id] + tokenizer.encode(m["role"] + template.role_separator), False)
        add(tokenizer.encode(m["content"]) + [end_id], m["role"] == "assistant")
        add(sep, False)
    if add_generation_prompt:
        add([start_id] + tokenizer.encode("assistant" + template.role_separator), False)
    mask_arr = np.asarray(mask, np.float32)
    if loss_on == "all":
        mask_arr = np.ones_like(mask_arr)
        mask_arr[:1] = 0.0
    return np.asarray(ids, np.int32), mask_arr


def _jinja(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"config key chat.template: tokenizer {tokenizer.path} has no chat "
                         "template; use chat.template='chatml'")
    return tokenizer.apply_chat_template(list(messages),
                                         add_generation_prompt=add_generation_prompt)


def _render_jinja_tokens(tokenizer: Any, messages: Sequence[Message], loss_on: str,
                         add_generation_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """`render_tokens` with the tokenizer's Jinja template: the conversation is rendered one
    message longer at a time, and each new stretch of text is encoded on its own; an assistant
    message's stretch is split into its header (the text the template writes with
    add_generation_prompt) and the trained rest (content and end-of-turn marker)."""
    pieces: list[tuple[str, bool]] = []
    done = ""

    def extend(text: str, trained: bool, k: int) -> None:
        nonlocal done
        if not text.startswith(done):
            raise ValueError(f"chat template of {tokenizer.path}: the rendering of the first "
                             f"{k} messages is not a prefix of the rendering of more; its "
                             "conversations cannot be masked for training")
        pieces.append((text[len(done):], trained))
        done = text

    for k, m in enumerate(messages):
        if m["role"] == "assistant" and k:
            extend(_jinja(tokenizer, messages[:k], True), False, k)
        extend(_jinja(tokenizer, messages[:k + 1], False), m["role"] == "assistant", k + 1)
    if add_generation_prompt:
        extend(_jinja(tokenizer, messages, True), False, len(messages))
    ids: list[int] = []
    mask: list[float] = []
    for text, trained in pieces:
        tokens = tokenizer.encode(text)
        ids.extend(tokens)
        mask.extend([1.0 if trained else 0.0] * len(tokens))
    mask_arr = np.asarray(mask, np.float32)
    if loss_on == "all":
        mask_arr = np.ones_like(mask_arr)
        mask_arr[:1] = 0.0
    return np.asarray(ids, np.int32), mask_arr


def generation_prompt(tokenizer: Any, messages: Sequence[Message], *, add_bos: bool) -> str:
    """The text a chat model continues: the tokenizer's own Jinja chat template when it has
    one (a Hugging Face tokenizer.json), else ChatML. `add_bos`: the caller puts the BOS id
    first itself, so a BOS the template writes is left out."""
    if not getattr(tokenizer, "chat_template", None):
        return render_messages(list(messages), add_generation_prompt=True)
    text = _jinja(tokenizer, messages, True)
    bos = tokenizer.special_token_strings.get("bos_token")
    return text[len(bos):] if add_bos and bos and text.startswith(bos) else text


def prompt_ids(tokenizer: Any, messages: Sequence[Message], *,
               template: ChatTemplate = CHATML) -> np.ndarray:
    """Ids of `messages` followed by the opening of an assistant turn: what a chat model is
    given to produce its answer (BOS included if the template adds it)."""
    return render_tokens(tokenizer, messages, template=template, add_generation_prompt=True)[0]


def response_ids(tokenizer: Any, content: str, *, template: ChatTemplate = CHATML) -> np.ndarray:
    """Ids of an assistant answer as it follows `prompt_ids`: its content and closing marker,
    the tokens `render_tokens` marks as trained for that message."""
    if template.from_tokenizer:  # the stretch the template adds after a generation prompt
        question = [{"role": "user", "content": "?"}]
        head = _jinja(tokenizer, question, True)
        full = _jinja(tokenizer, question + [{"role": "assistant", "content": content}], False)
        return np.asarray(tokenizer.encode(full[len(head):]), np.int32)
    _, end_id = special_ids(tokenizer, template)
    return np.asarray(tokenizer.encode(content) + [end_id], np.int32)


# The chat template of the sft, dpo, reward and distill stages; the stages that read it check it
# against data.special_tokens (check_chat_config).
CHAT = Section("chat", default_chat_config)
