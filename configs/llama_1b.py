"""A Llama-3.2-1B-shaped model: 16 layers x 2048, 32 query / 8 kv heads of 64, SwiGLU 8192,
RoPE theta 500000, tied embeddings, vocab 128256, context 2048; FSDP over all devices.

    python -m jaxlm.main --config=configs/llama_1b.py:data=/data/web/*.array_record \
        --workdir=gs://bucket/llama_1b

`stage=` picks another stage for the same model and `init=` the checkpoint directory it starts
from, e.g. GRPO (its frozen KL reference is that checkpoint too; without `init=` there is no
reference and rl.kl_coef is 0):

    python -m jaxlm.main --config=configs/llama_1b.py:stage=grpo,init=gs://bucket/sft/checkpoints \
        --workdir=gs://bucket/grpo --config.rl.task=arithmetic

Whether a stage's programs (for GRPO: the update and the rollout with its KV cache) fit a slice:

    python -m jaxlm.tools.aot --config=configs/llama_1b.py:stage=grpo --topology=v5p:2x2x1
"""

from jaxlm.data.config import use_files
from jaxlm.run import config as config_lib

RL_STAGES = ("grpo", "ppo", "rejection")


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, data="", tokenizer="", steps=50000, stage="pretrain",
                                init="")
    c = config_lib.base_config()
    c.stage = args.stage
    c.init_from.path = args.init

    c.model.vocab_size = 128256
    c.model.d_model = 2048
    c.model.num_layers = 16
    c.model.num_heads = 32
    c.model.num_kv_heads = 8
    c.model.head_dim = 64
    c.model.d_ff = 8192
    c.model.max_seq_len = 2048
    c.model.rope_theta = 500000.0
    c.model.tie_embeddings = True
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "save_dots"

    c.data.seq_len = 2048
    use_files(c.data, args.data, args.tokenizer)

    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 2000
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1

    c.train.global_batch_size = 512
    c.train.steps = args.steps
    c.eval.every_steps = 1000
    c.eval.tokens = 20_971_520
    c.mesh.data = 1
    c.mesh.fsdp = -1

    c.log.every_steps = 50
    c.log.sample_every = 1000

    if c.stage in RL_STAGES:
        # 32 prompts x 8 completions of up to 512 tokens a step (prompts get the other 1536);
        # the update's 256 rows in 4 microbatches (one would need ~105 GiB a v5p chip).
        c.train.global_batch_size = 32
        c.rl.group_size = 8
        c.rl.max_new_tokens = 512
        c.optim.grad_accum_steps = 4
        c.rl.kl_coef = 0.04 if args.init else 0.0
    config_lib.validate(c)
    return c
