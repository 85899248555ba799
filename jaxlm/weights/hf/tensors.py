"""Which HF tensor holds which jaxlm parameter, and the layout change between the two.

One `TensorMap` per HF tensor names the jaxlm parameters it fills and two functions, one per
direction, so import and export cannot drift apart. Layouts:

* HF `nn.Linear` weights are [out, in]; jaxlm keeps [in, out] with heads split out:
  wq [D, H, K], wk/wv [D, N, K], wo [H, K, D]. GPT-2's `Conv1D` weights are already [in, out],
  and its `c_attn` holds q, k and v side by side ([D, 3D]).
* RoPE: jaxlm's `apply_rope` rotates the pairs (i, i + K/2) of each head, which is exactly
  HF Llama's `rotate_half`, so q/k rows need no permutation (Meta's original interleaved
  checkpoints are permuted by HF's own converter before they reach the Hub).
* GQA: HF repeats kv head n for query heads n*G .. n*G+G-1; jaxlm groups query heads the same
  way (reshape H -> N x G), so heads keep their order.
* Vocabulary: jaxlm's embedding/head have `padded_vocab_size` rows; HF keeps `vocab_size`. Import
  fills the first rows (padding rows stay 0); export drops the padding rows.
* Gemma: `post_attention_layernorm` is the norm on the attention output (`post_attn_norm`),
  `pre_feedforward_layernorm` the MLP's input norm (`mlp_norm`); both sides store the RMSNorm
  scale w of x * (1 + w), so norms copy as they are.
* Tied embeddings: jaxlm has no `head` param; HF writes no `lm_head.weight` (an existing one is
  skipped on import).
* Stacked layers: with `scan_layers` the block params carry a leading `layers` axis
  (`blocks/attn/wq[i]`); without, they live under `block_<i>/`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxlm.models.config import ModelConfig
from jaxlm.weights.hf.config import GPT2, family

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor and the jaxlm params (inside block `layer`, or top-level if None) it fills.

    `to_jaxlm(hf_array)` returns one array per entry of `params` (vocab-sized axes unpadded);
    `to_hf(*jaxlm_arrays)` takes the full jaxlm arrays (layer slice already taken) and returns
    the HF tensor.
    """

    name: str
    shape: tuple[int, ...]
    params: tuple[Path, ...]
    layer: int | None
    to_jaxlm: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _linear(out_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    """HF [out, in] <-> jaxlm [in, *out_shape]."""
    return (lambda w: (w.T.reshape(w.shape[1], *out_shape),),
            lambda p: p.reshape(p.shape[0], -1).T)


def _linear_in(in_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    """HF [out, in] <-> jaxlm [*in_shape, out] (the output projection of attention)."""
    return (lambda w: (w.T.reshape(*in_shape, w.shape[0]),),
            lambda p: p.reshape(-1, p.shape[-1]).T)


def _same() -> tuple[Callable, Callable]:
    return (lambda w: (w,), lambda p: p)


def _vocab_rows(vocab: int) -> tuple[Callable, Callable]:
    """HF [V, D] <-> jaxlm [padded V, D] (import returns V rows; export drops the padding)."""
    return (lambda w: (w,), lambda p: p[:vocab])


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every HF tensor of the model `cfg` describes, in the order HF lists them."""
    return _gpt2_maps(cfg) if family(cfg) == GPT2 else _llama_maps(cfg)


def _llama_maps(cfg: ModelConfig) -> list[TensorMap]:
    d, h, n, k, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff,
                        cfg.vocab_size)
    maps = [TensorMap("model.embed_tokens.weight", (v, d), (("embed",),), None,
                      *_vocab_rows(v))]
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."

        def add(name, shape, path, fns, i=i, pre=pre):
            maps.append(TensorMap(pre + name, shape, (path,), i, *fns))

        add("input_layernorm.weight", (d,), ("attn_norm", "scale"), _same())
        add("self_attn.q_proj.weight", (h * k, d), ("attn", "wq"), _linear((h, k)))
        add("self_attn.k_proj.weight", (n * k, d), ("attn", "wk"), _linear((n, k)))
        add("self_attn.v_proj.weight", (n * k, d), ("attn", "wv"), _linear((n, k)))
        if cfg.qkv_bias:
            add("self_attn.q_proj.bias", (h * k,), ("attn", "bq"), _bias((h, k)))
            add("self_attn.k_proj.bias", (n * k,), ("attn", "bk"), _bias((n, k)))
            add("self_attn.v_proj.bias", (n * k,), ("attn", "bv"), _bias((n, k)))
        add("self_attn.o_proj.weight", (d, h * k), ("attn", "wo"), _linear_in((h, k)))
        if cfg.qk_norm:
            add("self_attn.q_norm.weight", (k,), ("attn", "q_norm", "scale"), _same())
            add("self_attn.k_norm.weight", (k,), ("attn", "k_norm", "scale"), _same())
        if cfg.post_norms:  # Gemma: a norm after attention, and around the MLP
            add("post_attention_layernorm.weight", (d,), ("post_attn_norm", "scale"), _same())
            add("pre_feedforward_layernorm.weight", (d,), ("mlp_norm", "scale"), _same())
            add("post_feedforward_layernorm.weight", (d,), ("post_mlp_norm", "scale"), _same())
        else:
            add("post_attention_layernorm.weight", (d,), ("mlp_norm", "scale"), _same())
        add("mlp.gate_proj.weight", (f, d), ("mlp", "w_gate"), _transpose())
        add("mlp.up_proj.weight", (f, d), ("mlp", "w_in"), _transpose())
        add("mlp.down_proj.weight", (d, f), ("mlp", "w_out"), _transpose())
    maps.append(TensorMap("model.norm.weight", (d,), (("final_norm", "scale"),), None, *_same()))
    if not cfg.tie_embeddings:
        maps.append(TensorMap("lm_head.weight", (v, d), (("head",),), None,
                              lambda w: (w.T,), lambda p: p[:, :v].T))
    return maps


def _transpose() -> tuple[Callable, Callable]:
    return (lambda w: (w.T,), lambda p: p.T)


def _bias(shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    return (lambda b: (b.reshape(shape),), lambda p: p.reshape(-1))


def _gpt2_maps(cfg: ModelConfig) -> list[TensorMap]:
    d, h, k, f, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    maps = [TensorMap("transformer.wte.weight", (v, d), (("embed",),), None, *_vocab_rows(v)),
            TensorMap("transformer.wpe.weight", (cfg.max_seq_len, d), (("pos_embed",),), None,
                      *_same())]
    qkv = (("attn", "wq"), ("attn", "wk"), ("attn", "wv"))
    qkv_bias = (("attn", "bq"), ("attn", "bk"), ("attn", "bv"))
    for i in range(cfg.num_layers):
        pre = f"transformer.h.{i}."

        def add(name, shape, params, to_jaxlm, to_hf, i=i, pre=pre):
            maps.append(TensorMap(pre + name, shape, params, i, to_jaxlm, to_hf))

        add("ln_1.weight", (d,), (("attn_norm", "scale"),), *_same())
        add("ln_1.bias", (d,), (("attn_norm", "bias"),), *_same())
        add("attn.c_attn.weight", (d, 3 * d), qkv,
            lambda w: tuple(x.reshape(d, h, k) for x in np.split(w, 3, axis=1)),
            lambda *ps: np.concatenate([p.reshape(d, h * k) for p in ps], axis=1))
        add("attn.c_attn.bias", (3 * d,), qkv_bias,
            lambda b: tuple(x.reshape(h, k) for x in np.split(b, 3)),
            lambda *ps: np.concatenate([p.reshape(-1) for p in ps]))
        add("attn.c_proj.weight", (d, d), (("attn", "wo"),),
            lambda w: (w.reshape(h, k, d),), lambda p: p.reshape(h * k, d))
        add("attn.c_proj.bias", (d,), (("attn", "bo"),), *_same())
        add("ln_2.weight", (d,), (("mlp_norm", "scale"),), *_same())
        add("ln_2.bias", (d,), (("mlp_norm", "bias"),), *_same())
        add("mlp.c_fc.weight", (d, f), (("mlp", "w_in"),), *_same())
        add("mlp.c_fc.bias", (f,), (("mlp", "b_in"),), *_same())
        add("mlp.c_proj.weight", (f, d), (("mlp", "w_out"),), *_same())
        add("mlp.c_proj.bias", (d,), (("mlp", "b_out"),), *_same())
    maps.append(TensorMap("transformer.ln_f.weight", (d,), (("final_norm", "scale"),), None,
                          *_same()))
    maps.append(TensorMap("transformer.ln_f.bias", (d,), (("final_norm", "bias"),), None,
                          *_same()))
    if not cfg.tie_embeddings:
        maps.append(TensorMap("lm_head.weight", (v, d), (("head",),), None,
                              lambda w: (w.T,), lambda p: p[:, :v].T))
    return maps


def param_slot(cfg: ModelConfig, path: Path, layer: int | None) -> tuple[Path, int | None]:
    """Where `path` (relative to a block when `layer` is set) lives in the jaxlm param tree,
    and the index on its leading `layers` axis (None: the whole array)."""
    if layer is None:
        return path, None
    if cfg.scan_layers:
        return ("blocks", *path), layer
    return (f"block_{layer}", *path), None


# HF tensors that carry no parameters: causal-mask buffers of old GPT-2 files, cached RoPE
# frequencies of old Llama files.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def canonical_name(name: str, cfg: ModelConfig) -> str | None:
    """The name `tensor_maps` uses for a tensor of a HF file, or None for a non-parameter.

    GPT-2 files from the Hub name tensors without the `transformer.` prefix that
    `save_pretrained` writes; a tied model's redundant `lm_head.weight` is skipped.
    """
    if name.endswith(_BUFFER_SUFFIXES):
        return None
    if name == "lm_head.weight" and cfg.tie_embeddings:
        return None
    if family(cfg) == GPT2 and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name
