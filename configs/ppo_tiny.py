"""PPO from a reward model (RLHF) on configs/grpo_tiny.py's model, task and tokenizer.

    python -m jaxlm.main --workdir=runs/ppo \
        --config=configs/ppo_tiny.py:init=runs/sft/checkpoints,reward_model=runs/rm/checkpoints

The policy starts from init (an SFT run of configs/grpo_tiny.py's model; also the KL
reference) and gets a value head on its trunk (zero at the start); the reward model is a
reward-stage run (`configs/grpo_tiny.py:phase=reward`), trained on chat pairs of the task, so
prompts are chat-formatted as its pairs were (rl.chat) and completions stop at the end of the
answer turn, the token the reward model reads. The held-out evaluation decodes the 400
held-out problems greedily and scores them with rl.rewards (exact answers); the training log
has the reward model's scores (reward_mean) and the exact answers (task_reward_mean) of the
samples. docs/rl.md has the whole chain (pretrain -> SFT -> reward model -> PPO) and its
figures. Arguments: `configs/ppo_tiny.py:init=DIR,reward_model=DIR,steps=N`.
"""

from pathlib import Path

from jaxlm.run import config as config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, init="runs/sft/checkpoints",
                                reward_model="runs/rm/checkpoints", steps=2000)
    c = config_lib.load_config_file(Path(__file__).with_name("grpo_tiny.py"),
                                    f"init={args.init},steps={args.steps}")
    c.stage = "ppo"
    c.rl.reward_model = args.reward_model
    c.rl.kl_coef = 0.05
    c.ppo.kl_target = 0.0
    c.ppo.value_coef = 0.1
    c.ppo.value_clip = 0.2
    # 8 completions a prompt, each scored against its prompt's mean score: the advantage is
    # how a completion compares with the prompt's others, not how the reward model rates the
    # prompt, which the value head cannot yet predict in the first hundreds of steps.
    c.rl.group_size = 8
    c.ppo.score_baseline = "group_mean"
    c.rl.loss_norm = "token"
    c.rl.num_epochs = 1
    config_lib.validate(c)
    return c
