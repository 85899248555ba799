"""GPT-2 small (124M): 12 layers x 768, 12 heads, learned positions, LayerNorm, GELU, biases,
tied embeddings, vocab 50257 padded to 50304, context 1024.

    python -m jaxlm.main --config=configs/gpt2_124m.py:data=/data/fineweb/train-*.array_record \
        --workdir=/tmp/gpt2_124m

`data=` takes comma-free globs of tokenized shards (jaxlm/tools/prepare_data.py) or raw .jsonl /
.parquet / .txt files; without it the run uses the embedded stdlib corpus (a smoke test).
"""

from jaxlm.data.config import use_files
from jaxlm.run import config as config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, data="", tokenizer="", steps=19073)
    c = config_lib.base_config()

    c.model.vocab_size = 50257
    c.model.d_model = 768
    c.model.num_layers = 12
    c.model.num_heads = 12
    c.model.d_ff = 3072
    c.model.max_seq_len = 1024
    c.model.position_embedding = "learned"
    c.model.norm = "layernorm"
    c.model.mlp_activation = "gelu"
    c.model.use_bias = True
    c.model.tie_embeddings = True
    c.model.compute_dtype = "bfloat16"

    c.data.seq_len = 1024
    use_files(c.data, args.data, args.tokenizer)

    # nanoGPT's recipe: ~0.5M tokens per step, 6e-4 peak, 10B tokens in 19073 steps.
    c.optim.learning_rate = 6e-4
    c.optim.warmup_steps = 700
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.optim.b2 = 0.95

    c.train.global_batch_size = 512
    c.train.steps = args.steps
    c.eval.every_steps = 1000
    c.eval.tokens = 10_485_760
    c.mesh.data = -1

    c.log.every_steps = 50
    c.log.sample_every = 1000
    config_lib.validate(c)
    return c
