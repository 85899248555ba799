"""GRPO on procedurally generated arithmetic with checked answers (CPU, no download).

    python -m jaxlm.main --config=configs/grpo_tiny.py --workdir=runs/grpo
    python -m jaxlm.main --config=configs/grpo_tiny.py:init=runs/rs/checkpoints \
        --workdir=runs/grpo

Prompts are "a+b=" / "a-b=" with operands in [0, 9]; the reward is 1 for the exact answer plus
0.1 for a completion that is one integer (jaxlm/stages/rl/rewards.py); a fifth of the prompts are
held
out and decoded greedily every eval.every_steps steps (eval_reward_mean, eval_accuracy). From a
random init only the format reward moves; start from a policy that has seen the task (init=: a
rejection-sampling or SFT run of this model, see docs/rl.md), which also turns on the KL penalty
to it. Arguments: `configs/grpo_tiny.py:init=DIR,steps=N`.
"""

from jaxlm.run import config as config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, init="", steps=100)
    c = config_lib.base_config()
    c.stage = "grpo"

    c.model.d_model = 64
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.d_ff = 256
    c.model.tie_embeddings = True

    # The tokenizer is trained on a slice of the stdlib corpus (digits are single pieces).
    c.data.source = "stdlib"
    c.data.vocab_size = 512
    c.data.max_documents = 200
    # Prompt slots + rl.max_new_tokens completion slots.
    c.data.seq_len = 16
    c.data.eval_fraction = 0.2

    c.rl.task = "arithmetic"
    c.rl.max_operand = 9
    c.rl.operations = "+-"
    c.rl.rewards = "correct:1.0,format:0.1"
    c.rl.group_size = 8
    c.rl.max_new_tokens = 6
    c.rl.temperature = 1.0
    c.rl.kl_coef = 0.04 if args.init else 0.0
    c.init_from.path = args.init

    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0

    c.train.global_batch_size = 16
    c.train.steps = args.steps
    c.eval.every_steps = 25
    c.eval.examples = 32  # held-out prompts

    c.log.every_steps = 5
    c.log.sample_every = 0
    c.checkpoint.every_steps = 50
    config_lib.validate(c)
    return c
