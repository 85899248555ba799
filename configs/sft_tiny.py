"""SFT of the configs/tiny.py model on the English chatterbot-corpus dialogs (no download).

    python -m jaxlm.main --config=configs/tiny.py --workdir=/tmp/jaxlm_tiny
    python -m jaxlm.main --config=configs/sft_tiny.py --workdir=/tmp/jaxlm_tiny_sft

Starts from the newest checkpoint of the tiny run (`init_from`) and uses its tokenizer (recorded
in that checkpoint; it holds the chat markers <|im_start|>/<|im_end|>). The 2,026 dialogs of
`pip install 'jaxlm[chat]'` are rendered with the ChatML template, packed several per row, and
only the assistant turns are trained. Arguments: `configs/sft_tiny.py:pretrained=/tmp/run,steps=N`
(pretrained = the tiny run's workdir).
"""

import os
from pathlib import Path

from jaxlm.data.chat import render_messages
from jaxlm.run import config as config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, pretrained="/tmp/jaxlm_tiny", steps=300)
    c = config_lib.load_config_file(Path(__file__).with_name("tiny.py"))
    c.stage = "sft"
    c.init_from.path = os.path.join(args.pretrained, "checkpoints")

    c.sft.paths = "chatterbot"
    c.sft.loss_on = "assistant"
    c.sft.truncation = "truncate"
    c.sft.packing = True
    c.data.eval_fraction = 0.05

    c.optim.learning_rate = 1e-3
    c.optim.weight_decay = 0.0

    # Batch size, warmup and checkpoint interval: configs/tiny.py's.
    c.train.steps = args.steps
    c.eval.every_steps = 100

    c.log.sample_every = 100
    c.log.sample_prompt = render_messages([{"role": "user", "content": "Hello, how are you?"}],
                                          add_generation_prompt=True)
    c.log.sample_tokens = 24
    config_lib.validate(c)
    return c
