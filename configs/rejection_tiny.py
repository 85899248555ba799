"""Rejection sampling (expert iteration) on configs/grpo_tiny.py's task, from the same start.

    python -m jaxlm.main --config=configs/rejection_tiny.py --workdir=runs/rs

Every step samples rl.group_size completions of each of 16 prompts, keeps each prompt's best
when it is the exact answer (rl.keep_min_reward=1) and takes one SFT step on the kept ones (a
step that keeps nothing takes no update). The model, tokenizer, task and starting policy are
configs/grpo_tiny.py's: with no init, its SFT phase trains first in <workdir>/init, the same
run (same seed, data and steps) GRPO starts from. Arguments:
`configs/rejection_tiny.py:init=DIR,steps=N` (init: a checkpoints directory instead).
"""

from pathlib import Path

from jaxlm.run import config as config_lib

GRPO_TINY = Path(__file__).with_name("grpo_tiny.py")


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, init="", steps=1000)
    c = config_lib.load_config_file(GRPO_TINY, f"init={args.init},steps={args.steps}")
    c.stage = "rejection"
    c.rl.kl_coef = 0.0
    c.rl.keep_min_reward = 1.0
    c.optim.learning_rate = 1e-3
    c.init_from.config = "" if args.init else f"{GRPO_TINY}:phase=sft"
    config_lib.validate(c)
    return c
