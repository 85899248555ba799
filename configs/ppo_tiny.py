"""PPO from a reward model (RLHF) on configs/grpo_tiny.py's model, task and tokenizer.

    python -m jaxlm.main --config=configs/ppo_tiny.py --workdir=runs/ppo \
        --config.init_from.path=runs/sft/checkpoints --config.rl.reward_model=runs/rm/checkpoints

The policy starts from init_from (also the KL reference) and gets a value head on its trunk
(zero at the start); the reward model is a reward-stage checkpoint of the same architecture and
tokenizer. The held-out evaluation scores greedy answers with rl.rewards (exact answers).
Arguments: `configs/ppo_tiny.py:init=DIR,reward_model=DIR,steps=N`.
"""

from pathlib import Path

from jaxlm.run import config as config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, init="runs/sft/checkpoints",
                                reward_model="runs/rm/checkpoints", steps=100)
    c = config_lib.load_config_file(Path(__file__).with_name("grpo_tiny.py"),
                                    f"init={args.init},steps={args.steps}")
    c.stage = "ppo"
    c.rl.reward_model = args.reward_model
    c.rl.kl_coef = 0.05
    c.ppo.kl_target = 0.0
    c.ppo.value_coef = 0.1
    c.ppo.value_clip = 0.2
    c.rl.group_size = 4
    c.rl.loss_norm = "token"
    c.rl.num_epochs = 2
    config_lib.validate(c)
    return c
