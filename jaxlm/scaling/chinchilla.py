"""The Chinchilla model family: the architectures of Hoffmann et al. (2022), Table A9.

Each row is (params in millions as the paper reports them, d_model, ffw_size, kv_size, n_heads,
n_layers); the vocabulary is 32,000 for all of them. `kv_size` is the width of one head, which
is not always d_model / n_heads (e.g. the 4608-wide, 32-head 12569M row), so `head_dim` is set
explicitly.

Parameter counts. The paper's numbers follow one formula, N = n_layers (5 d_model hk +
2 d_model ffw_size) + V d_model with hk = n_heads x kv_size: per layer the four attention
projections, one d_model x hk projection of the relative position encoding and the two MLP
matrices, plus one vocabulary matrix (no norms, no biases). It reproduces all 50 rows within
0.8% (`jaxlm.scaling.flops.count_params(...)["chinchilla"]`); `train.param_convention="chinchilla"`,
the default, makes token budgets use it, so 20 tokens per parameter is the paper's budget.

Shapes, and why. The MLP is the paper's plain two-matrix one of width ffw_size (GELU) and the
norm RMSNorm. Two choices differ from the paper, and change only the count "as built":
  * position encoding: RoPE instead of Transformer-XL relative positions. RoPE is jaxlm's
    relative encoding (every attention kernel supports it) and has no weights, so as built a
    layer lacks the paper's d_model x hk projection (-7% of N at 1018M);
  * embeddings: untied, a separate [d_model, V] output head, the layout of the family's
    existing runs and checkpoints. It is the second vocabulary matrix that the paper's count
    does not hold (+V d_model: +32% of N at 44M, +1% at 16183M).
As built, N = chinchilla + V d_model + norms - n_layers d_model hk (`count` in
`python -m jaxlm.tools.scaling` prints both).

`configs/chinchilla.py:size=<M>` builds a run config from a row; `configs/chinchilla_1b.py` is
the 1018M row.
"""

from __future__ import annotations

import ml_collections

VOCAB_SIZE = 32000

# (params_million, d_model, ffw_size, kv_size, n_heads, n_layers), in the paper's order.
TABLE_A9 = (
    (44, 512, 2048, 64, 8, 8), (57, 576, 2304, 64, 9, 9), (74, 640, 2560, 64, 10, 10),
    (90, 640, 2560, 64, 10, 13), (106, 640, 2560, 64, 10, 16), (117, 768, 3072, 64, 12, 12),
    (140, 768, 3072, 64, 12, 15), (163, 768, 3072, 64, 12, 18), (175, 896, 3584, 64, 14, 14),
    (196, 896, 3584, 64, 14, 16), (217, 896, 3584, 64, 14, 18), (251, 1024, 4096, 64, 16, 16),
    (278, 1024, 4096, 64, 16, 18), (306, 1024, 4096, 64, 16, 20), (425, 1280, 5120, 128, 10, 18),
    (489, 1280, 5120, 128, 10, 21), (509, 1408, 5632, 128, 11, 18),
    (552, 1280, 5120, 128, 10, 24), (587, 1408, 5632, 128, 11, 21),
    (632, 1536, 6144, 128, 12, 19), (664, 1408, 5632, 128, 11, 24),
    (724, 1536, 6144, 128, 12, 22), (816, 1536, 6144, 128, 12, 25),
    (893, 1792, 7168, 128, 14, 20), (1018, 1792, 7168, 128, 14, 23),
    (1143, 1792, 7168, 128, 14, 26), (1266, 2048, 8192, 128, 16, 22),
    (1424, 2176, 8704, 128, 17, 22), (1429, 2048, 8192, 128, 16, 25),
    (1593, 2048, 8192, 128, 16, 28), (1609, 2176, 8704, 128, 17, 25),
    (1731, 2304, 9216, 128, 18, 24), (1794, 2176, 8704, 128, 17, 28),
    (2007, 2304, 9216, 128, 18, 28), (2283, 2304, 9216, 128, 18, 32),
    (2298, 2560, 10240, 128, 20, 26), (2639, 2560, 10240, 128, 20, 30),
    (2980, 2560, 10240, 128, 20, 34), (3530, 2688, 10752, 128, 22, 36),
    (3802, 2816, 11264, 128, 22, 36), (4084, 2944, 11776, 128, 22, 36),
    (4516, 3072, 12288, 128, 24, 36), (6796, 3584, 14336, 128, 28, 40),
    (9293, 4096, 16384, 128, 32, 42), (11452, 4352, 17408, 128, 32, 47),
    (12295, 4608, 18432, 128, 36, 44), (12569, 4608, 18432, 128, 32, 47),
    (13735, 4864, 19456, 128, 32, 47), (14940, 4992, 19968, 128, 32, 49),
    (16183, 5120, 20480, 128, 40, 47),
)
SIZES = tuple(row[0] for row in TABLE_A9)


def row(size: int) -> dict[str, int]:
    """The Table A9 row of the model the paper calls `size` million parameters."""
    for params_million, d_model, ffw_size, kv_size, n_heads, n_layers in TABLE_A9:
        if params_million == size:
            return {"params_million": params_million, "d_model": d_model, "ffw_size": ffw_size,
                    "kv_size": kv_size, "n_heads": n_heads, "n_layers": n_layers}
    raise ValueError(f"config argument size: {size} is not a Table A9 row; one of {SIZES}")


def set_model(model: ml_collections.ConfigDict, size: int) -> None:
    """Sets the `model` section of a run config to the architecture of row `size`."""
    r = row(size)
    model.vocab_size = VOCAB_SIZE
    model.d_model = r["d_model"]
    model.d_ff = r["ffw_size"]
    model.head_dim = r["kv_size"]
    model.num_heads = r["n_heads"]
    model.num_kv_heads = r["n_heads"]
    model.num_layers = r["n_layers"]
    model.norm = "rmsnorm"
    model.mlp_activation = "gelu"
    model.tie_embeddings = False
