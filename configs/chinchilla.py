"""The Chinchilla family (Hoffmann et al. 2022, Table A9) trained on 20 tokens per parameter.

    python -m jaxlm.main --config=configs/chinchilla.py:size=1018,data=/data/mc4/*.array_record \
        --workdir=gs://bucket/chinchilla_1018m

`size` is a Table A9 row in millions of parameters as the paper reports them (44 ... 16183; see
jaxlm/scaling/chinchilla.py). The number of steps is not set: it follows from
`train.tokens_per_param`
(20, the paper's compute-optimal ratio) x the model's parameter count / tokens per step; pass
`tokens=<T>` for a fixed token budget instead (or `--config.train.steps=<S>` with
`--config.train.tokens_per_param=0`). Parameters are counted as the paper counts them
(`train.param_convention="chinchilla"`: one vocabulary matrix and a relative-position projection
per layer; within 0.8% of every Table A9 row), not as built: the family uses RoPE and an untied
head (why: jaxlm/scaling/chinchilla.py). Sequence 2048, batch 256 x 2048 = 0.5M tokens per step.
Counts: `python -m jaxlm.tools.scaling count --config=configs/chinchilla.py:size=1018`.
"""

from jaxlm.data.config import use_files
from jaxlm.run import config as config_lib
from jaxlm.scaling import chinchilla


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, size=1018, data="", tokenizer="", tokens=0,
                                tokens_per_param=20.0, steps=0)
    c = config_lib.base_config()
    chinchilla.set_model(c.model, args.size)
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
    # One budget: explicit steps, or explicit tokens, or tokens per parameter (the default).
    c.train.steps = args.steps
    c.train.tokens = args.tokens
    c.train.tokens_per_param = 0.0 if (args.steps or args.tokens) else args.tokens_per_param
    c.eval.every_steps = 1000
    c.eval.tokens = 10_485_760
    c.mesh.data = 1
    c.mesh.fsdp = -1

    c.log.every_steps = 50
    c.log.sample_every = 2000
    config_lib.validate(c)
    return c
