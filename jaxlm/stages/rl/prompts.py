"""The prompt pipeline of the RL stages: task examples -> left-padded prompt rows -> batches.

Like every other stage's data it is a grain pipeline (shuffled per epoch from data.seed on the
train split, repeated, sliced by process), so its position is saved with each checkpoint and a
resumed run draws exactly the prompts it would have. A batch holds

    prompt [b, P] int32   BOS + the prompt's tokens, left-padded with pad_id to P; with rl.chat
                          the prompt as a user turn of the chat template followed by the
                          opening of the assistant's turn (`jaxlm.data.chat.prompt_ids`)
    prompt_valid [b, P]   1 on the real tokens
    example_id [b]        the example's index in its split (rewards look the answer up)

with P = data.seq_len - rl.max_new_tokens.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np

from jaxlm.data import chat
from jaxlm.data.sft import example_stream
from jaxlm.data.tasks import Example, split_examples
from jaxlm.run.errors import ConfigError


def prompt_length(config: ml_collections.ConfigDict) -> int:
    return config.data.seq_len - config.rl.max_new_tokens


def prompt_template(config: ml_collections.ConfigDict) -> chat.ChatTemplate | None:
    """The chat template prompts are rendered with (rl.chat), or None for raw prompts."""
    return chat.template_from_config(config.chat) if config.rl.chat else None


def prompt_ids(tokenizer: Any, text: str, template: chat.ChatTemplate | None = None
               ) -> list[int]:
    """BOS + the text's ids; with a template, the text as a user turn and the opening of the
    assistant's turn (the ids an SFT'd chat model answers, and reward pairs start with)."""
    if template is not None:
        return [int(t) for t in chat.prompt_ids(tokenizer, [{"role": "user", "content": text}],
                                                 template=template)]
    bos = getattr(tokenizer, "bos_id", -1)
    return ([bos] if bos is not None and bos >= 0 else []) + list(tokenizer.encode(text))


def tokenize_prompts(examples: list[Example], tokenizer: Any, length: int,
                     template: chat.ChatTemplate | None = None) -> list[dict[str, np.ndarray]]:
    """One left-padded row per example (chat-rendered with `template`); raises naming
    data.seq_len if a prompt is too long."""
    pad = max(getattr(tokenizer, "pad_id", 0), 0)
    rows = []
    for i, ex in enumerate(examples):
        ids = prompt_ids(tokenizer, ex["prompt"], template)
        if len(ids) > length:
            raise ConfigError(f"config key data.seq_len: prompt {ex['prompt']!r} has {len(ids)} "
                             f"tokens, more than data.seq_len - rl.max_new_tokens = {length}")
        tokens = np.full(length, pad, np.int32)
        valid = np.zeros(length, np.int32)
        tokens[length - len(ids):], valid[length - len(ids):] = ids, 1
        rows.append({"prompt": tokens, "prompt_valid": valid, "example_id": np.int32(i)})
    return rows


def make_prompt_iterator(config: ml_collections.ConfigDict, tokenizer: Any, *, split: str,
                         batch_size: int, process_index: int = 0, process_count: int = 1
                         ) -> grain.DatasetIterator:
    """Endless iterator of this process's prompt batches of `split` (see the module doc)."""
    rows = tokenize_prompts(split_examples(config, split), tokenizer, prompt_length(config),
                            prompt_template(config))
    ds = example_stream(rows, split=split, shuffle=config.data.shuffle, seed=config.data.seed,
                        process_index=process_index, process_count=process_count)
    return iter(ds.to_iter_dataset().batch(batch_size, drop_remainder=True))


def prompt_fields(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
    p = prompt_length(config)
    return {"prompt": ((p,), np.int32), "prompt_valid": ((p,), np.int32),
            "example_id": ((), np.int32)}


def make_data(config: ml_collections.ConfigDict, tokenizer: Any, *, split: str, batch_size: int,
              process_index: int, process_count: int, cache_dir: str) -> grain.DatasetIterator:
    """`Stage.make_data` of the RL stages: the prompt batches of `split`."""
    del cache_dir
    return make_prompt_iterator(config, tokenizer, split=split, batch_size=batch_size,
                                process_index=process_index, process_count=process_count)
