"""Tiny model configs and synthetic packed batches shared by the model and step tests."""

from __future__ import annotations

import numpy as np

from jaxlm.models import ModelConfig

LLAMA_TINY = ModelConfig(vocab_size=250, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, d_ff=64, max_seq_len=16)
GPT2_TINY = ModelConfig(vocab_size=250, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                        head_dim=8, d_ff=64, max_seq_len=16, position_embedding="learned",
                        norm="layernorm", mlp_activation="gelu", use_bias=True,
                        tie_embeddings=True)


def packed_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows holding 2-3 documents each (plus padding in some rows), next-token layout."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(batch, length + 1)).astype(np.int32)
    seg = np.zeros((batch, length + 1), np.int32)
    pos = np.zeros((batch, length + 1), np.int32)
    for b in range(batch):
        cuts = sorted(rng.choice(np.arange(2, length - 1), size=2, replace=False))
        end = length + 1 - (b % 2) * 2  # odd rows end in 2 padding tokens
        bounds = [0, *cuts, end]
        for i in range(len(bounds) - 1):
            seg[b, bounds[i]:bounds[i + 1]] = i + 1
            pos[b, bounds[i]:bounds[i + 1]] = np.arange(bounds[i + 1] - bounds[i])
    inputs_seg, target_seg = seg[:, :-1], seg[:, 1:]
    mask = ((inputs_seg == target_seg) & (inputs_seg > 0)).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": inputs_seg,
            "positions": pos[:, :-1], "loss_mask": mask}
