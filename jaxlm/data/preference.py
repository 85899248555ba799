"""The preference-pair input pipeline (DPO): pairs -> chosen/rejected token rows -> batches.

    pairs (jsonl {prompt, chosen, rejected} or the chatterbot demonstration set, in memory)
      -> eval holdout: data.eval_fraction under a fixed permutation (or dpo.eval_paths)
      -> tokens: prompt_ids(prompt) then response_ids(answer) (jaxlm/data/chat.py); the same
         prompt ids start the chosen and the rejected sequence
      -> too long for data.seq_len + 1 tokens: keep the newest dpo.max_prompt_tokens of the
         prompt (0 = no cut; BOS stays), then cut the answers at the end; a pair with an empty
         answer left is dropped; all counted and logged
      -> train: shuffled per epoch from data.seed, repeated; eval: the first eval.examples
         pairs in a fixed order, each once, the last batch filled with empty rows (pair_id -1,
         no tokens) that the eval steps do not count; process p takes pairs p,
         p + process_count, ...
      -> batch: inputs, targets, segment_ids, positions (int32) and loss_mask (float32, 1 on the
         answer's target tokens), each [batch, 2, seq_len] with [:, 0] chosen and [:, 1]
         rejected, so both sequences of a pair sit in the same batch row (one device); and
         pair_id [batch] (the pair's index in its split).

With precomputed reference log-probs (dpo.reference="precompute") each batch also holds
ref_logps [batch, 2], looked up by pair_id in the table the trainer computed before training.

A reward model reads whole sequences instead (`whole=True`, the reward stage): `inputs` holds
every token of prompt + answer, the answer's end marker included, in at most data.seq_len
slots, so the score read at the last real token is read at that marker, the token an RL
rollout that stops ends with (as TRL's reward trainer appends EOS and reads the last token).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

from jaxlm.data import chat, conversations
from jaxlm.data.sft import example_stream
from jaxlm.run.errors import ConfigError


@dataclasses.dataclass
class PairCounts:
    pairs: int = 0
    prompt_truncated: int = 0
    answer_truncated: int = 0
    dropped: int = 0
    examples: int = 0


def _row(prompt: np.ndarray, answer: np.ndarray, seq_len: int, pad_id: int
         ) -> dict[str, np.ndarray]:
    ids = np.concatenate([prompt, answer])
    n, pad = len(ids) - 1, seq_len - (len(ids) - 1)
    mask = np.concatenate([np.zeros(len(prompt) - 1, np.float32), np.ones(len(answer),
                                                                          np.float32)])
    fill = lambda a, v: np.concatenate([a, np.full(pad, v, a.dtype)])
    return {"inputs": fill(ids[:-1], pad_id), "targets": fill(ids[1:], pad_id),
            "loss_mask": fill(mask, 0.0), "segment_ids": fill(np.ones(n, np.int32), 0),
            "positions": fill(np.arange(n, dtype=np.int32), 0)}


def _whole_row(prompt: np.ndarray, answer: np.ndarray, seq_len: int, pad_id: int
               ) -> dict[str, np.ndarray]:
    """Every token in `inputs` (the last real one is the answer's last, its end marker);
    targets are the next tokens of the same row (pad after the last), loss_mask 0."""
    ids = np.concatenate([prompt, answer])
    n, pad = len(ids), seq_len - len(ids)
    fill = lambda a, v: np.concatenate([a, np.full(pad, v, a.dtype)])
    return {"inputs": fill(ids, pad_id), "targets": fill(np.append(ids[1:], pad_id), pad_id),
            "loss_mask": np.zeros(seq_len, np.float32),
            "segment_ids": fill(np.ones(n, np.int32), 0),
            "positions": fill(np.arange(n, dtype=np.int32), 0)}


def tokenize_pairs(pairs: list[conversations.Pair], tokenizer: Any, *,
                   template: chat.ChatTemplate, seq_len: int, max_prompt_tokens: int,
                   whole: bool = False) -> tuple[list[dict[str, np.ndarray]], PairCounts]:
    """One example per kept pair: each field [2, seq_len] (chosen, rejected), and pair_id.
    whole: rows of whole sequences (a reward model's, see the module doc) instead of the
    next-token layout; a pair then fits in seq_len tokens, not seq_len + 1."""
    counts = PairCounts(pairs=len(pairs))
    limit = seq_len if whole else seq_len + 1
    keep_bos = 1 if template.add_bos else 0
    examples = []
    for pair in pairs:
        prompt = chat.prompt_ids(tokenizer, pair.prompt, template=template)
        answers = [chat.response_ids(tokenizer, a, template=template)
                   for a in (pair.chosen, pair.rejected)]
        if max_prompt_tokens and len(prompt) > max_prompt_tokens and \
                len(prompt) + max(map(len, answers)) > limit:
            prompt = np.concatenate([prompt[:keep_bos],
                                     prompt[len(prompt) - max_prompt_tokens + keep_bos:]])
            counts.prompt_truncated += 1
        room = limit - len(prompt)
        if room < 1:
            counts.dropped += 1
            continue
        if max(map(len, answers)) > room:
            counts.answer_truncated += 1
            answers = [a[:room] for a in answers]
        make_row = _whole_row if whole else _row
        rows = [make_row(prompt, a, seq_len, tokenizer.pad_id) for a in answers]
        example = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        example["pair_id"] = np.int32(len(examples))
        examples.append(example)
        counts.examples += 1
    return examples, counts


def split_pairs(config: ml_collections.ConfigDict, split: str, section: str = "dpo"
                ) -> list[conversations.Pair]:
    """The pairs of `split` (<section>.paths with a holdout, or <section>.eval_paths)."""
    read = functools.partial(conversations.read_pairs, seed=config.data.seed)
    return conversations.read_split(read, config, section, split)


def split_examples(config: ml_collections.ConfigDict, tokenizer: Any, split: str,
                   section: str = "dpo") -> list[dict[str, np.ndarray]]:
    """Tokenised pairs of `split`; `section` ("dpo" or "reward") holds paths and prompt cut.
    The reward section's rows hold whole sequences (`tokenize_pairs(whole=True)`)."""
    examples, counts = tokenize_pairs(
        split_pairs(config, split, section), tokenizer,
        template=chat.template_from_config(config.chat), seq_len=config.data.seq_len,
        max_prompt_tokens=config[section].max_prompt_tokens, whole=section == "reward")
    logging.info("%s %s data: %s", section, split, dataclasses.asdict(counts))
    if not examples:
        raise ConfigError(f"config key {section}.paths: no {split} pair fits data.seq_len="
                         f"{config.data.seq_len} ({dataclasses.asdict(counts)})")
    return examples


class _AddReference(grain.transforms.Map):
    def __init__(self, table_Nx2: np.ndarray):
        self.table_Nx2 = table_Nx2

    def map(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ref = (self.table_Nx2[ex["pair_id"]] if ex["pair_id"] >= 0
               else np.zeros(self.table_Nx2.shape[1:]))  # an empty eval row
        return {**ex, "ref_logps": ref.astype(np.float32)}


def _empty_row(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A row of no pair (pair_id -1, no tokens: segment_ids and loss_mask 0) that fills the
    last eval batch; the eval steps count only rows with tokens."""
    return {**{k: np.zeros_like(v) for k, v in example.items()}, "pair_id": np.int32(-1)}


def eval_examples(examples: list[dict[str, np.ndarray]], count: int, batch_size: int
                  ) -> list[dict[str, np.ndarray]]:
    """The held-out pairs one evaluation reads: the first `count` (all, when there are fewer),
    each once, then empty rows up to ceil(count / batch_size) full batches."""
    kept = examples[:count]
    rows = -(-count // batch_size) * batch_size
    return kept + [_empty_row(examples[0])] * (rows - len(kept))


def make_pair_iterator(config: ml_collections.ConfigDict, tokenizer: Any, *, split: str,
                       batch_size: int, process_index: int = 0, process_count: int = 1,
                       reference_Nx2: np.ndarray | None = None, section: str = "dpo"
                       ) -> grain.DatasetIterator:
    """Endless iterator of pair batches of `split` for this process (see the module doc)."""
    examples = split_examples(config, tokenizer, split, section)
    if split == "eval":  # each held-out pair counted once per evaluation
        examples = eval_examples(examples, config.eval.examples, batch_size * process_count)
    ds = example_stream(examples, split=split, shuffle=config.data.shuffle,
                        seed=config.data.seed, process_index=process_index,
                        process_count=process_count)
    if reference_Nx2 is not None:
        if len(reference_Nx2) != len(examples):
            raise ValueError(f"reference table has {len(reference_Nx2)} rows for "
                             f"{len(examples)} {split} pairs")
        ds = ds.map(_AddReference(reference_Nx2))
    return iter(ds.to_iter_dataset().batch(batch_size, drop_remainder=True))


def one_pass_batches(config: ml_collections.ConfigDict, tokenizer: Any, *, split: str,
                     batch_size: int, process_index: int = 0, process_count: int = 1):
    """Every pair of `split` once, in pair_id order, as global batches of `batch_size` rows of
    which this process yields its share; the last batch is padded with rows of pair_id -1."""
    examples = split_examples(config, tokenizer, split)
    local = batch_size // process_count
    pad = dict(examples[0], pair_id=np.int32(-1),
               loss_mask=np.zeros_like(examples[0]["loss_mask"]))
    for start in range(0, len(examples), batch_size):
        rows = examples[start:start + batch_size]
        rows = rows + [pad] * (batch_size - len(rows))
        mine = rows[process_index * local:(process_index + 1) * local]
        yield {k: np.stack([r[k] for r in mine]) for k in mine[0]}
