"""GRPO that learns, in one command on a CPU: three-operand arithmetic with checked answers.

    python -m jaxlm.main --config=configs/grpo_tiny.py --workdir=runs/grpo

The task: "a+b-c=" with a, b, c in [0, 9] and + / - (4,000 problems, answers -18..27, no
download). A tenth of them (400) are held out under a fixed permutation; of the rest, half
(1,800) are the supervised problems and half the GRPO prompts, so the policy GRPO starts from
has never seen its prompts. The run is two phases in one workdir:

1. `phase=sft` (init_from.config, in <workdir>/init): a short SFT of a random-init model on
   the supervised problems as chat turns (user: "3+4-2=", assistant: "5"); it trains the
   tokenizer on a slice of the stdlib corpus (digits single pieces). It stops early on purpose:
   a policy that answers some held-out problems and samples the right answer among a group
   of 8 for many more.
2. `phase=grpo`: GRPO from that checkpoint (also the KL reference) on the other problems,
   prompts chat-formatted as in SFT, completions stopping at the end of the answer turn; the
   reward is 1 for the exact answer plus 0.1 for an integer. The held-out problems are decoded
   greedily before the first step and every eval.every_steps steps (eval_accuracy on all 400).

Arguments: `configs/grpo_tiny.py:phase=grpo|sft,steps=N,init=DIR` (init: start from another
run's checkpoints instead of training the SFT phase; steps: this phase's steps, 0 = its
default). docs/rl.md shows the measured curve.
"""

from jaxlm.run import config as config_lib

SFT_STEPS, GRPO_STEPS = 400, 2000
PHASES = {"pretrain": "pretrain", "sft": "sft", "reward": "reward", "grpo": "grpo"}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, phase="grpo", steps=0, init="")
    if args.phase not in PHASES:
        raise ValueError(f"config argument phase: {args.phase!r} is not one of {list(PHASES)}")
    c = config_lib.base_config()
    c.stage = PHASES[args.phase]

    c.model.d_model = 64
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.d_ff = 256
    c.model.tie_embeddings = True

    # The tokenizer is trained on a slice of the stdlib corpus (digits are single pieces, the
    # chat markers special tokens) by the first phase; later phases read it from the
    # checkpoint they start from.
    c.data.source = "stdlib"
    c.data.vocab_size = 512
    c.data.max_documents = 200
    # The chat prompt of "a+b-c=" (21 tokens) + rl.max_new_tokens completion slots.
    c.data.seq_len = 28
    c.data.eval_fraction = 0.1

    c.rl.task = "arithmetic"
    c.rl.max_operand = 9
    c.rl.operations = "+-"
    c.rl.num_operands = 3
    c.rl.sft_fraction = 0.5
    c.rl.chat = True
    c.rl.rewards = "correct:1.0,format:0.1"
    c.rl.group_size = 8
    c.rl.max_new_tokens = 6
    c.rl.temperature = 1.0
    c.rl.kl_coef = 0.04

    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.train.global_batch_size = 16
    # Held-out evaluation: all 400 held-out problems (or pairs).
    c.eval.examples = 400
    c.log.every_steps = 10
    c.log.sample_every = 0
    c.checkpoint.every_steps = 500
    c.init_from.path = args.init

    if args.phase == "pretrain":  # next-token prediction on the stdlib corpus
        c.data.seq_len = 128
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 20
        c.train.steps = args.steps or 300
        c.eval.every_steps = 0
        c.eval.tokens = 4 * c.train.global_batch_size * c.data.seq_len
    elif args.phase == "sft":  # the supervised problems as chat turns
        c.sft.paths = "task"
        c.sft.packing = True
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 20
        c.train.global_batch_size = 32
        c.train.steps = args.steps or SFT_STEPS
        c.eval.every_steps = 0
        c.eval.tokens = 4 * c.train.global_batch_size * c.data.seq_len
    elif args.phase == "reward":  # right answer preferred to one off by 1-3
        c.reward.paths = "task"
        c.optim.learning_rate = 1e-3
        c.optim.warmup_steps = 20
        c.train.steps = args.steps or 1000
        c.eval.every_steps = 250
    else:
        c.init_from.config = "" if args.init else f"{__file__}:phase=sft"
        c.optim.learning_rate = 5e-4
        # Adam's first steps are sign steps of size lr on every weight: warm up so they do
        # not knock a policy off what SFT taught it.
        c.optim.warmup_steps = 50
        c.train.steps = args.steps or GRPO_STEPS
        c.eval.every_steps = 200
    config_lib.validate(c)
    return c
