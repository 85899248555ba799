"""Rejection sampling (expert iteration) on procedurally generated arithmetic (CPU, no download).

    python -m jaxlm.main --config=configs/rejection_tiny.py:init=runs/x/checkpoints \
        --workdir=runs/rs

Every step samples rl.group_size completions of each of 16 prompts, keeps each prompt's best
when it is the exact answer (rl.keep_min_reward=1) and takes one SFT step on the kept ones.
The model, tokenizer and task are configs/grpo_tiny.py's, so either run's checkpoint starts the
other. Arguments: `configs/rejection_tiny.py:init=DIR,steps=N` (init: a checkpoints directory;
"" = random init, where exact answers are rare and little is kept).
"""

from pathlib import Path

from jaxlm.run import config as config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, init="", steps=100)
    c = config_lib.load_config_file(Path(__file__).with_name("grpo_tiny.py"),
                                    f"init={args.init},steps={args.steps}")
    c.stage = "rejection"
    c.rl.kl_coef = 0.0
    c.rl.keep_min_reward = 1.0
    c.optim.learning_rate = 1e-3
    config_lib.validate(c)
    return c
