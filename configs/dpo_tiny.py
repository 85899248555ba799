"""DPO of the configs/sft_tiny.py model on demonstration pairs built from chatterbot dialogs.

    python -m jaxlm.main --config=configs/tiny.py --workdir=/tmp/jaxlm_tiny
    python -m jaxlm.main --config=configs/sft_tiny.py --workdir=/tmp/jaxlm_tiny_sft
    python -m jaxlm.main --config=configs/dpo_tiny.py --workdir=/tmp/jaxlm_tiny_dpo

A demonstration set, not a real preference corpus: for every assistant turn of every dialog,
chosen = the corpus answer and rejected = an answer drawn (fixed seed) from another dialog, so
the model learns to prefer on-topic replies. The SFT checkpoint is both the starting policy and
the frozen reference. Arguments: `configs/dpo_tiny.py:sft=/tmp/run,steps=N,variant=ipo`
(sft = the SFT run's workdir; variant = sigmoid, ipo, conservative or simpo).
"""

import os
from pathlib import Path

from jaxlm.run import config as config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, sft="/tmp/jaxlm_tiny_sft", steps=200, variant="sigmoid")
    # The SFT run's model is configs/tiny.py's; its checkpoint is the starting policy.
    c = config_lib.load_config_file(Path(__file__).with_name("tiny.py"))
    c.stage = "dpo"
    c.init_from.path = os.path.join(args.sft, "checkpoints")

    c.dpo.paths = "chatterbot"
    c.dpo.variant = args.variant
    c.dpo.beta = 0.1 if args.variant != "simpo" else 2.0
    c.dpo.label_smoothing = 0.1 if args.variant == "conservative" else 0.0
    c.dpo.reference = "jit"
    c.dpo.max_prompt_tokens = 64
    c.data.eval_fraction = 0.05

    c.optim.learning_rate = 3e-5
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0

    # Batch size and checkpoint interval: configs/tiny.py's.
    c.train.steps = args.steps
    c.eval.every_steps = 100
    c.eval.examples = 256  # held-out pairs

    c.log.sample_every = 0
    config_lib.validate(c)
    return c
