"""Chinchilla (Hoffmann et al. 2022) Table A9 row "1018M": d_model 1792, ffw 7168, 14 heads of
128, 23 layers, vocab 32000, sequence 2048; trained on 20 tokens per parameter.

    python -m jaxlm.main --config=configs/chinchilla_1b.py:data=/data/mc4/*.array_record \
        --workdir=gs://bucket/chinchilla_1b

RMSNorm, a GELU MLP of width ffw_size; RoPE replaces the paper's relative position encoding and
the head is untied (why: jaxlm/scaling/chinchilla.py). Batch 256 x 2048 = 0.5M tokens per step (the
paper
uses 0.5M-1M for models of this size); 20 x 1017.5M params (the paper's convention; 1001.1M as
built) = 20.35B tokens = 38,815 steps.
It is `configs/chinchilla.py:size=1018` (docs/scaling.md) with this step count fixed instead of
derived from 20 tokens per parameter.
"""

from pathlib import Path

from jaxlm.data.config import use_files
from jaxlm.run import config as config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, data="", tokenizer="", steps=38815)
    # The family's Table A9 row and recipe (configs/chinchilla.py), for a fixed number of steps.
    c = config_lib.load_config_file(Path(__file__).with_name("chinchilla.py"), "size=1018")
    use_files(c.data, args.data, args.tokenizer)
    c.train.steps = args.steps
    c.train.tokens_per_param = 0.0
    config_lib.validate(c)
    return c
