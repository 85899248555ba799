"""The config sections of the post-training stages (`sft`, `dpo`, `reward`, `distill`):
defaults, checks.

Each is declared once here as a `Section` (`SFT`, `DPO`, `REWARD`, `DISTILL`) and listed in the
`Stage.sections` of the stages that read it; `jaxlm.run.config.validate` runs the checks of the
stage a run selects. Importing this module pulls in no stage module and no grain.
"""

from __future__ import annotations

import ml_collections

from jaxlm.data.chat import check_chat_config
from jaxlm.data.config import split_list
from jaxlm.losses.distill import KINDS as DIVERGENCES
from jaxlm.run import errors
from jaxlm.run.section import Section

LOSS_ON = ("assistant", "all")
TRUNCATION = ("truncate", "drop")
DPO_VARIANTS = ("sigmoid", "ipo", "conservative", "simpo")
REFERENCE_MODES = ("jit", "precompute")
DISTILL_DATA = ("corpus", "chat")


def default_sft_config() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    # Conversations: "chatterbot" (the English dialogs of the chatterbot-corpus package) or
    # comma-separated globs of jsonl files with one {"messages": [{role, content}, ...]} a line.
    s.paths = "chatterbot"
    # Held-out conversations; "" = data.eval_fraction of sft.paths under a fixed permutation.
    s.eval_paths = ""
    # Which target tokens count in the loss: "assistant" (assistant content and its closing
    # marker) or "all" (prompt tokens too).
    s.loss_on = "assistant"
    # A conversation longer than data.seq_len + 1 tokens is cut ("truncate") or left out
    # ("drop"); the counts are logged.
    s.truncation = "truncate"
    # Several conversations per row (each its own attention segment) instead of one per row.
    s.packing = True
    return s


def default_dpo_config() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # Preference pairs: "chatterbot" (a demonstration set built from its dialogs: chosen = the
    # corpus answer, rejected = an answer of another dialog) or comma-separated jsonl globs of
    # {prompt, chosen, rejected} records (strings or message lists; HH-RLHF and UltraFeedback
    # layouts, see jaxlm/data/conversations.py).
    d.paths = "chatterbot"
    # Held-out pairs; "" = data.eval_fraction of dpo.paths under a fixed permutation.
    d.eval_paths = ""
    # "sigmoid" (DPO), "ipo", "conservative" (DPO with label smoothing > 0) or "simpo"
    # (reference-free, length-normalised, with a target margin). docs/post_training.md.
    d.variant = "sigmoid"
    # Inverse temperature of the implicit reward (for ipo: 1 / (2 beta) is the target margin).
    d.beta = 0.1
    # sigmoid / conservative: probability that a preference label is flipped (the smoothed
    # sigmoid loss, as TRL applies it; conservative needs > 0). Refused for ipo and simpo.
    d.label_smoothing = 0.0
    # ipo: divide each answer's log-probs (policy and reference) by its token count before the
    # loss, as TRL does (True, the common practice); False = Azar et al.'s summed log-probs.
    # The two conventions need different betas.
    d.ipo_normalize = True
    # simpo: target reward margin gamma.
    d.simpo_gamma = 0.5
    # Reference log-probs: "jit" (computed in the train step from a frozen copy of the initial
    # params, sharded like the policy) or "precompute" (one pass over the pairs before training,
    # then the frozen copy is freed: half the parameter memory). Unused by simpo.
    d.reference = "jit"
    # Prompt tokens kept (the newest) when prompt + answer exceed data.seq_len + 1; answers are
    # then cut at the end. Pairs that still do not fit are dropped; all counted and logged.
    d.max_prompt_tokens = 0
    return d


def default_reward_config() -> ml_collections.ConfigDict:
    r = ml_collections.ConfigDict()
    # Preference pairs, as dpo.paths ("chatterbot" or jsonl globs of {prompt, chosen, rejected}).
    r.paths = "chatterbot"
    # Held-out pairs; "" = data.eval_fraction of reward.paths under a fixed permutation.
    r.eval_paths = ""
    # Bradley-Terry with margin m: -log sigmoid(r_chosen - r_rejected - m); 0 = plain.
    r.margin = 0.0
    # As dpo.max_prompt_tokens.
    r.max_prompt_tokens = 0
    return r


def _fail(key: str, msg: str) -> None:
    raise errors.config_error(key, msg)


def _check_chat_section(config: ml_collections.ConfigDict, stage: str) -> None:
    """What every post-training section has: chat data, and (pair stages) a prompt cut."""
    check_chat_config(config.chat, split_list(config.data.special_tokens),
                      config.data.tokenizer_path)
    section = config[stage]
    if not split_list(section.paths):
        _fail(f"{stage}.paths", "is empty; set 'chatterbot' or jsonl globs")
    if "max_prompt_tokens" in section:
        errors.check_at_least(f"{stage}.max_prompt_tokens", section.max_prompt_tokens, 0)


def check_sft(config: ml_collections.ConfigDict) -> None:
    _check_chat_section(config, "sft")
    s = config.sft
    errors.check_choice("sft.loss_on", s.loss_on, LOSS_ON)
    errors.check_choice("sft.truncation", s.truncation, TRUNCATION)


def check_dpo(config: ml_collections.ConfigDict) -> None:
    _check_chat_section(config, "dpo")
    d = config.dpo
    errors.check_choice("dpo.variant", d.variant, DPO_VARIANTS)
    errors.check_choice("dpo.reference", d.reference, REFERENCE_MODES)
    if d.beta <= 0:
        _fail("dpo.beta", f"must be positive, got {d.beta}")
    errors.check_interval("dpo.label_smoothing", d.label_smoothing, 0, 0.5, "[)")
    if d.label_smoothing and d.variant not in ("sigmoid", "conservative"):
        _fail("dpo.label_smoothing", f"{d.label_smoothing} has no effect on dpo.variant="
              f"{d.variant!r}: it smooths the sigmoid loss (sigmoid, conservative) only; set 0")
    if d.variant == "conservative" and not d.label_smoothing:
        _fail("dpo.label_smoothing", "dpo.variant='conservative' is DPO with label smoothing; "
              "set a value in (0, 0.5) (0 would be plain dpo.variant='sigmoid')")
    if d.variant != "simpo" and not config.init_from.path:
        _fail("init_from.path", f"dpo.variant={d.variant!r} needs a reference model: the "
              "checkpoint directory of the SFT run (its params start the policy too)")


def check_reward(config: ml_collections.ConfigDict) -> None:
    _check_chat_section(config, "reward")
    if config.log.sample_every:
        _fail("log.sample_every", "a reward model does not generate text; set it to 0")


def default_distill_config() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # The teacher: a jaxlm checkpoint directory (<workdir>/checkpoints, or the workdir) or the
    # <out_dir>/checkpoints of a Hugging Face model imported with jaxlm/tools/convert_hf.py. It must
    # use this run's tokenizer (left empty, data.tokenizer_path becomes the teacher's).
    d.teacher = ""
    # Step of the teacher's checkpoint; -1 = its newest.
    d.teacher_step = -1
    # Divergence D(teacher, student): "forward" KL(p || q) (Hinton et al.), "reverse" KL(q || p)
    # or "jsd" (generalised Jensen-Shannon of GKD, weight distill.beta on the teacher).
    d.loss = "forward"
    # Softmax temperature T of both distributions; the divergence is scaled by T^2.
    d.temperature = 2.0
    # Weight of the hard-label cross-entropy; 1 - alpha weighs the divergence.
    d.alpha = 0.5
    # jsd only: the teacher's weight in the mixture m = beta p + (1 - beta) q, in (0, 1).
    d.beta = 0.5
    # forward only: keep the teacher's top_k logits (renormalised) for large vocabularies; 0 =
    # all.
    d.top_k = 0
    # "corpus": the pretraining data (continued pretraining); "chat": the sft section's
    # conversations and loss mask (distillation after SFT).
    d.data = "corpus"
    return d


def check_distill(config: ml_collections.ConfigDict) -> None:
    d = config.distill
    if not d.teacher:
        _fail("distill.teacher", "is empty; give the teacher's checkpoint directory")
    if d.loss not in DIVERGENCES:
        _fail("distill.loss", f"{d.loss!r} is not one of {DIVERGENCES}")
    if d.data not in DISTILL_DATA:
        _fail("distill.data", f"{d.data!r} is not one of {DISTILL_DATA}")
    if d.temperature <= 0:
        _fail("distill.temperature", f"must be positive, got {d.temperature}")
    if not 0 <= d.alpha <= 1:
        _fail("distill.alpha", f"must lie in [0, 1], got {d.alpha}")
    if not 0 < d.beta < 1:
        _fail("distill.beta", f"must lie in (0, 1), got {d.beta}")
    if d.top_k < 0:
        _fail("distill.top_k", f"must be >= 0, got {d.top_k}")
    if d.top_k and d.loss != "forward":
        _fail("distill.top_k", f"keeps the teacher's top logits for loss='forward' only, not "
              f"{d.loss!r}; set 0")
    if d.data == "chat":
        check_sft(config)


SFT = Section("sft", default_sft_config, check_sft)
DPO = Section("dpo", default_dpo_config, check_dpo)
REWARD = Section("reward", default_reward_config, check_reward)
DISTILL = Section("distill", default_distill_config, check_distill)
