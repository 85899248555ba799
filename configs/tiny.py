"""Tiny Llama-style model on the embedded stdlib corpus: the CPU default, a few minutes on 2 cores.

    python -m jaxlm.main --config=configs/tiny.py --workdir=/tmp/jaxlm_tiny

The first run builds the corpus from this Python's standard library and trains an 8192-piece
sentencepiece tokenizer on it (cached in <workdir>/cache); later runs reuse both.
Argument: `configs/tiny.py:steps=N` sets the number of steps (default 600: 255 s of training
and evals on a 2-core CPU, the corpus and tokenizer build on top; see docs/benchmarks.md "The
first run" for how the model shape, vocabulary, batch, learning rate and steps were chosen).
"""

from jaxlm.run import config as config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, steps=600)
    c = config_lib.base_config()

    # 6 narrow layers: against 4 layers of d_model 256 (4 heads, 2 kv, d_ff 768) at the same
    # 600 x 2,048 tokens, they cost less compute per token and reach lower bits per byte on the
    # held-out stdlib split (1.596 against 1.625) and on pure-Python packages never trained on
    # (2.250 against 2.290); a 4096-piece vocabulary, 256-token rows and learning rate 5e-3 did
    # worse (docs/benchmarks.md "The first run").
    c.model.d_model = 192
    c.model.num_layers = 6
    c.model.num_heads = 3
    c.model.num_kv_heads = 1
    c.model.d_ff = 576
    c.model.tie_embeddings = True

    c.data.source = "stdlib"
    c.data.seq_len = 128
    c.data.vocab_size = 8192

    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 20
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1

    c.train.global_batch_size = 16
    c.train.steps = args.steps
    c.eval.every_steps = 150
    c.eval.tokens = 32768

    c.log.every_steps = 10
    c.checkpoint.every_steps = 300
    c.log.sample_every = 150
    c.log.sample_prompt = "def"
    config_lib.validate(c)
    return c
