"""The tiny model with a mixture of experts in every other block: 8 experts, top-2, on CPU.

    python -m jaxlm.main --config=configs/tiny_moe.py --workdir=/tmp/jaxlm_tiny_moe

Same data, width and schedule as configs/tiny.py; blocks 2 and 4 have 8 experts of width 768
(2.6x the parameters of tiny.py, 1.5x its MLP FLOPs per token). Arguments:
`steps=N`, `experts=E`, `top_k=1|2`, `expert_parallel=P` (mesh.expert; P must divide E and
the batch of 16), `dropless=True`. See docs/moe.md.
"""

from jaxlm import config as config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, steps=200, experts=8, top_k=2, expert_parallel=1,
                                dropless=False)
    c = config_lib.base_config()

    c.model.d_model = 256
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.d_ff = 768
    c.model.tie_embeddings = True

    c.model.moe.num_experts = args.experts
    c.model.moe.top_k = args.top_k
    c.model.moe.capacity_factor = 1.25
    c.model.moe.dropless = args.dropless
    c.model.moe.every = 2
    c.model.moe.aux_loss_weight = 0.01
    c.model.moe.router_z_loss_weight = 0.001
    c.mesh.expert = args.expert_parallel

    c.data.source = "stdlib"
    c.data.seq_len = 128
    c.data.vocab_size = 8192

    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 20
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1

    c.train.global_batch_size = 16
    c.train.steps = args.steps
    c.train.eval_every = 50
    c.train.eval_steps = 4

    c.log.every_steps = 10
    c.checkpoint.every_steps = 100
    c.log.sample_every = 50
    c.log.sample_prompt = "def "
    config_lib.validate(c)
    return c
