"""A character tokenizer and tiny GRPO configs for the RL tests (no sentencepiece, no data)."""

from __future__ import annotations

import ml_collections

from jaxlm.run import config as config_lib

_CHARS = "0123456789+-*= \nabcdefghijklmnopqrstuvwxyz"
# The chat template's markers, one id each (after the characters).
_SPECIAL = ("<|im_start|>", "<|im_end|>")


class CharTokenizer:
    """ids 0-3: pad, unk, BOS, EOS; then one id per character of `_CHARS`, then the chat
    markers."""

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3
    path, sha256 = "chars", ""
    vocab_size = 4 + len(_CHARS) + len(_SPECIAL)

    def encode(self, text: str) -> list[int]:
        return [4 + _CHARS.index(ch) if ch in _CHARS else 1 for ch in text]

    def decode(self, ids) -> str:
        return "".join(_CHARS[i - 4] for i in ids if 4 <= i < 4 + len(_CHARS))

    def piece_to_id(self, piece: str) -> int:
        if piece in _SPECIAL:
            return 4 + len(_CHARS) + _SPECIAL.index(piece)
        return self.encode(piece)[0] if len(piece) == 1 else self.unk_id

    def id_to_piece(self, i: int) -> str:
        if i >= 4 + len(_CHARS):
            return _SPECIAL[i - 4 - len(_CHARS)]
        return _CHARS[i - 4] if i >= 4 else "<unk>"


def grpo_config(stage_: str = "grpo", **rl) -> ml_collections.ConfigDict:
    """The tiny RL config of the tests (stage_: grpo or rejection); keyword args set rl.*."""
    c = config_lib.base_config()
    c.stage = stage_
    c.model.vocab_size = CharTokenizer.vocab_size
    c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 2, 4
    c.model.num_kv_heads, c.model.d_ff = 2, 64
    c.data.update(seq_len=14, eval_fraction=0.2)
    c.train.update(global_batch_size=8, steps=20)
    c.optim.update(learning_rate=3e-3, warmup_steps=0, weight_decay=0.0)
    c.log.sample_every = 0
    c.log.peak_flops = 1e11  # MFU against a fixed number: no start-up measurement
    c.rl.update(max_operand=4, group_size=4, max_new_tokens=6, kl_coef=0.0)
    for k, v in rl.items():
        c.rl[k] = v
    return c


def reward_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run config a reward-stage run of `config`'s model saves with its checkpoints (the
    model of the reward stage: the scalar head, no vocabulary head)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.stage = "reward"
    return c
