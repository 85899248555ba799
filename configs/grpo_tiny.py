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

The PPO chain of docs/rl.md uses three more phases of the same task: `phase=pretrain` (the
stdlib corpus, before the policy's SFT), `phase=reward_sft` (the reward model's own SFT: a
deeper model, 6 layers of d_model 128, on the policy's tokenizer, `tokenizer=`) and
`phase=reward` (that model trained on preference pairs of the task: the right answer against
near misses, other problems' answers, empty and trailing answers).

Arguments: `configs/grpo_tiny.py:phase=grpo|sft|pretrain|reward_sft|reward,steps=N,init=DIR,
tokenizer=FILE` (init: start from another run's checkpoints instead of training the SFT
phase; steps: this phase's steps, 0 = its default; tokenizer: a sentencepiece .model to read
instead of training one). docs/rl.md shows the measured curves.
"""

from jaxlm.run import config as config_lib

SFT_STEPS, GRPO_STEPS = 400, 2000
REWARD_SFT_STEPS, REWARD_STEPS = 3500, 4000
PHASES = {"pretrain": "pretrain", "sft": "sft", "reward_sft": "sft", "reward": "reward",
          "grpo": "grpo"}
# The reward model of the PPO chain (docs/rl.md) is deeper than the policy: it must compare the
# written answer with the one it computes, at the answer's end marker.
REWARD_MODEL = {"d_model": 128, "num_layers": 6, "d_ff": 512}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, phase="grpo", steps=0, init="", tokenizer="")
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
    # Another run's tokenizer (a .model file), for a model that starts from no checkpoint but
    # must read the same pieces (the reward model's own SFT).
    c.data.tokenizer_path = args.tokenizer

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
    elif args.phase in ("sft", "reward_sft"):  # the supervised problems as chat turns
        c.sft.paths = "task"
        c.sft.packing = True
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 20
        c.train.global_batch_size = 32
        c.train.steps = args.steps or (REWARD_SFT_STEPS if args.phase == "reward_sft"
                                       else SFT_STEPS)
        c.eval.every_steps = 0
        c.eval.tokens = 4 * c.train.global_batch_size * c.data.seq_len
    elif args.phase == "reward":  # the right answer preferred to wrong ones
        c.reward.paths = "task"
        c.rl.pair_negatives = "near,other,empty,trailing"
        c.optim.learning_rate = 3e-4
        c.optim.warmup_steps = 100
        c.train.global_batch_size = 32
        c.train.steps = args.steps or REWARD_STEPS
        c.eval.every_steps = 250
    else:
        c.init_from.config = "" if args.init else f"{__file__}:phase=sft"
        c.optim.learning_rate = 5e-4
        # Adam's first steps are sign steps of size lr on every weight: warm up so they do
        # not knock a policy off what SFT taught it.
        c.optim.warmup_steps = 50
        c.train.steps = args.steps or GRPO_STEPS
        c.eval.every_steps = 200
    if args.phase in ("reward_sft", "reward"):
        c.model.update(REWARD_MODEL)
    config_lib.validate(c)
    return c
