"""Counters that must survive a resume even when the run's shape changes: tokens seen so far.

`tokens_seen` is saved with every checkpoint (in its `extra` item) and continues from there on
resume, so a run resumed with another train.global_batch_size or data.seq_len counts on from
the tokens it really saw instead of recomputing step x (new tokens per step). What changed
between the checkpoint's config and the run's is logged in one line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging

from jaxlm.run import config_changes

# Keys whose change on resume changes how many tokens a step sees.
SHAPE_KEYS = ("train.global_batch_size", "data.seq_len")


@dataclasses.dataclass
class TokenCounter:
    """tokens_seen at `base_step`, plus `tokens_per_step` for each step after it."""

    base_step: int
    base_tokens: int
    tokens_per_step: int

    def tokens_seen(self, step: int) -> int:
        return self.base_tokens + (step - self.base_step) * self.tokens_per_step


def _get(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def resumed_counter(ckpt: Any, step: int, tokens_per_step: int,
                    config: Any) -> TokenCounter:
    """The counter of a run that starts at `step` (restored from `ckpt`, or 0 for a new run)."""
    if step == 0:
        return TokenCounter(0, 0, tokens_per_step)
    try:
        extra = ckpt.read_json(step, "extra")
    except (FileNotFoundError, ValueError):
        extra = {}
    try:
        saved_config = ckpt.read_json(step, "config")
    except (FileNotFoundError, ValueError):
        saved_config = {}
    now = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    changed = config_changes.changes(saved_config, now, SHAPE_KEYS)
    if "tokens_seen" in extra:
        tokens = int(extra["tokens_seen"])
    else:  # a checkpoint from before tokens_seen was saved: its own shape tells
        batch = _get(saved_config, "train.global_batch_size")
        seq_len = _get(saved_config, "data.seq_len")
        now_tokens = (_get(now, "train.global_batch_size") or 1) * (_get(now, "data.seq_len") or 1)
        rows_per_sequence = max(tokens_per_step // now_tokens, 1)  # a stage's sequences_per_row
        saved_tps = batch * seq_len * rows_per_sequence if batch and seq_len else tokens_per_step
        tokens = step * saved_tps
    if changed:
        logging.warning("resuming at step %d with %s; tokens_seen continues from %s at %s "
                        "tokens per step", step, config_changes.describe(changed), f"{tokens:,}",
                        f"{tokens_per_step:,}")
    return TokenCounter(step, tokens, tokens_per_step)
