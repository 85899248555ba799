"""The SFT input pipeline: conversations -> chat-template tokens -> packed rows -> batches.

    conversations (jsonl `messages` or the chatterbot corpus, read into memory)
      -> eval holdout: data.eval_fraction of them under a fixed permutation (or sft.eval_paths)
      -> render with the chat template: ids and the mask of trained tokens (jaxlm/data/chat.py)
      -> conversations longer than data.seq_len + 1 tokens: cut to that length
         (sft.truncation="truncate") or left out ("drop"); both counted and logged, as are
         conversations left with no trained token
      -> train: shuffled per epoch from data.seed, repeated; eval: fixed order, repeated
      -> process p takes conversations p, p + process_count, ...
      -> sft.packing: several whole conversations per row (first-fit), each its own segment,
         so attention never crosses conversations and positions restart at 0; otherwise one
         conversation per row, padded
      -> batch [batch_size, data.seq_len]: inputs, targets, segment_ids, positions (int32),
         loss_mask (float32, 1 on trained target tokens), the layout of the pretraining batch.

A conversation is never split across rows, so no row starts mid-conversation. The result is
a grain DatasetIterator (checkpointable like the pretraining one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

from jaxlm.data import chat, conversations
from jaxlm.run.errors import ConfigError

TRUNCATION = ("truncate", "drop")


@dataclasses.dataclass
class SftCounts:
    """What happened to the conversations of one split."""

    conversations: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0


def tokenize_conversations(convs: list[list[chat.Message]], tokenizer: Any, *,
                           template: chat.ChatTemplate, seq_len: int, loss_on: str,
                           truncation: str) -> tuple[list[dict[str, np.ndarray]], SftCounts]:
    """Next-token examples {inputs, targets, loss_mask} of at most seq_len tokens each."""
    if truncation not in TRUNCATION:
        raise ConfigError(f"config key sft.truncation: {truncation!r} is not one of {TRUNCATION}")
    counts = SftCounts(conversations=len(convs))
    examples = []
    for messages in convs:
        ids, mask = chat.render_tokens(tokenizer, messages, template=template, loss_on=loss_on)
        if len(ids) > seq_len + 1:
            if truncation == "drop":
                counts.dropped_too_long += 1
                continue
            counts.truncated += 1
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        if not mask[1:].any():
            counts.dropped_no_target += 1
            continue
        examples.append({"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]})
        counts.examples += 1
        counts.tokens += len(ids) - 1
        counts.target_tokens += int(mask[1:].sum())
    return examples, counts


class _ToBatchLayout(grain.transforms.Map):
    """Packer output (or one padded example) -> the pretraining batch layout."""

    def __init__(self, seq_len: int, pad_id: int, packed: bool):
        self.seq_len, self.pad_id, self.packed = seq_len, pad_id, packed

    def map(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.packed:
            return {"inputs": ex["inputs"], "targets": ex["targets"],
                    "loss_mask": ex["loss_mask"].astype(np.float32),
                    "segment_ids": ex["inputs_segment_ids"].astype(np.int32),
                    "positions": ex["inputs_positions"].astype(np.int32)}
        n, pad = len(ex["inputs"]), self.seq_len - len(ex["inputs"])
        fill = lambda a, v: np.concatenate([a, np.full(pad, v, a.dtype)])
        return {"inputs": fill(ex["inputs"], self.pad_id),
                "targets": fill(ex["targets"], self.pad_id),
                "loss_mask": fill(ex["loss_mask"], 0.0),
                "segment_ids": fill(np.ones(n, np.int32), 0),
                "positions": fill(np.arange(n, dtype=np.int32), 0)}


def example_stream(examples: list[Any], *, split: str, shuffle: bool, seed: int,
                   process_index: int, process_count: int) -> grain.MapDataset:
    """Endless per-process stream: shuffled per epoch (train), repeated, sliced by process."""
    ds = grain.MapDataset.source(examples)
    if split == "train" and shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(None)[process_index::process_count]


def make_sft_iterator(config: ml_collections.ConfigDict, tokenizer: Any, *, split: str,
                      batch_size: int, process_index: int = 0,
                      process_count: int = 1) -> grain.DatasetIterator:
    """Endless iterator of packed SFT batches of `split` for this process (see module doc)."""
    sft, data = config.sft, config.data
    convs = conversations.read_split(conversations.read_conversations, config, "sft", split)
    examples, counts = tokenize_conversations(
        convs, tokenizer, template=chat.template_from_config(config.chat), seq_len=data.seq_len,
        loss_on=sft.loss_on, truncation=sft.truncation)
    logging.info("sft %s data: %s", split, dataclasses.asdict(counts))
    if not examples:
        raise ConfigError(f"config key sft.paths: no {split} conversation is left after "
                         f"truncation ({dataclasses.asdict(counts)})")
    ds = example_stream(examples, split=split, shuffle=data.shuffle, seed=data.seed,
                        process_index=process_index, process_count=process_count).to_iter_dataset()
    if sft.packing:
        lengths = {"inputs": data.seq_len, "targets": data.seq_len, "loss_mask": data.seq_len}
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=lengths, num_packing_bins=max(batch_size, 4), shuffle_bins=False,
            meta_features=("targets", "loss_mask"))
    ds = ds.map(_ToBatchLayout(data.seq_len, tokenizer.pad_id, sft.packing))
    return iter(ds.batch(batch_size, drop_remainder=True))
