"""The CPU throughput benchmark shape: GPT-2 style, 4 layers x 4 heads x d_model 256, seq 256,
batch 16, vocab 8192, float32.

    python benchmarks/train_throughput.py --config=configs/bench_cpu.py

Also trainable (`python -m jaxlm.main --config=configs/bench_cpu.py --workdir=/tmp/bench`).
"""

from jaxlm.run import config as config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, steps=200)
    c = config_lib.base_config()
    c.model.vocab_size = 8192
    c.model.d_model = 256
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.d_ff = 1024
    c.model.position_embedding = "learned"
    c.model.norm = "layernorm"
    c.model.mlp_activation = "gelu"
    c.model.use_bias = True
    c.model.tie_embeddings = True

    c.data.seq_len = 256
    c.data.vocab_size = 8192

    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.train.global_batch_size = 16
    c.train.steps = args.steps
    config_lib.validate(c)
    return c
