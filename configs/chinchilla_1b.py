"""Chinchilla (Hoffmann et al. 2022) Table A9 row "1018M": d_model 1792, ffw 7168, 14 heads of
128, 23 layers, vocab 32000, sequence 2048; trained on 20 tokens per parameter.

    python -m jaxlm.main --config=configs/chinchilla_1b.py:data=/data/mc4/*.array_record \
        --workdir=gs://bucket/chinchilla_1b

The paper's models use RMSNorm, a GELU MLP of width ffw_size and untied embeddings; its relative
position encoding is replaced by RoPE here. Batch 256 x 2048 = 0.5M tokens per step (the paper
uses 0.5M-1M for models of this size); 20 x ~1.0B params = ~20B tokens = 38,500 steps.
The same model with the step count derived from 20 tokens per parameter:
`configs/chinchilla.py:size=1018` (docs/scaling.md).
"""

from jaxlm import chinchilla
from jaxlm import config as config_lib
from jaxlm.data.config import use_files


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, data="", tokenizer="", steps=38500)
    c = config_lib.base_config()

    chinchilla.set_model(c.model, 1018)  # the Table A9 row (jaxlm/chinchilla.py)
    c.model.max_seq_len = 2048
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "save_dots"

    c.data.seq_len = 2048
    use_files(c.data, args.data, args.tokenizer)

    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 1500
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1

    c.train.global_batch_size = 256
    c.train.steps = args.steps
    c.train.eval_every = 1000
    c.train.eval_steps = 20
    c.mesh.data = 1
    c.mesh.fsdp = -1

    c.log.every_steps = 50
    c.log.sample_every = 2000
    config_lib.validate(c)
    return c
