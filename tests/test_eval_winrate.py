"""Win rate against a reference judged by a reward-model checkpoint (`--reward_model`)."""

import io

import jax
import numpy as np
import pytest

from jaxlm.evaluation import winrate
from jaxlm.evaluation.target import load_target
from jaxlm.inference.sampler import Request, Sampler
from jaxlm.models import Transformer
from jaxlm.run import trainer
from jaxlm.tools import eval as eval_cli
from tests.run_fixtures import tiny_run_config

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

pytest.importorskip("chatterbot_corpus")


def _config(tmp, **stage):
    c = tiny_run_config(tmp, num_layers=1, seq_len=64, steps=1)
    for key, value in stage.items():
        c[key] = value
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("winrate")
    trainer.run(_config(tmp), str(tmp / "policy"))
    c = _config(tmp, stage="reward")
    c.init_from.path = str(tmp / "policy" / "checkpoints")
    trainer.run(c, str(tmp / "rm"))
    return tmp


def test_win_rate_against_itself_is_one_half_and_rewards_are_the_judges(runs):
    out = io.StringIO()
    got = eval_cli.run(eval_cli.Options(
        workdir=str(runs / "policy"), tasks="", reward_model=str(runs / "rm"),
        reference=str(runs / "policy"), limit=3, max_new_tokens=8, batch_size=4,
        output=str(runs / "w.json")), stdout=out)["results"]["winrate"]
    assert got["win_rate"] == 0.5 and got["prompts"] == 3 and "win_rate" in out.getvalue()

    # The policy's mean reward, recomputed one prompt at a time: sampler + full forward.
    policy, judge = load_target(str(runs / "policy")), load_target(str(runs / "rm"))
    prompts = winrate.heldout_prompts(policy, 3)
    sampler = Sampler(policy.model_cfg, policy.params, pad_id=policy.tokenizer.pad_id)
    end_id = policy.tokenizer.raw.piece_to_id("<|im_end|>")
    score = jax.jit(lambda params, x: Transformer(judge.model_cfg).apply({"params": params}, x))
    rewards = []
    for p in prompts:
        answer = sampler.generate([Request(p, 8, (end_id, policy.tokenizer.eos_id))])[0].tokens
        seq = np.zeros((1, 128), np.int32)  # right-padded: causal, so the padding changes
        seq[0, :len(p + answer)] = p + answer  # nothing before it; one compiled program
        rewards.append(float(jax.device_get(score(judge.params, seq))[0, len(p + answer) - 1]))
    assert got["reward_policy"] == pytest.approx(np.mean(rewards), rel=1e-5, abs=1e-6)
    assert got["reward_reference"] == got["reward_policy"]


def test_a_language_model_is_no_judge(runs):
    with pytest.raises(ValueError, match="not a reward model"):
        eval_cli.run(eval_cli.Options(workdir=str(runs / "policy"), tasks="",
                                      reward_model=str(runs / "policy"),
                                      reference=str(runs / "policy"), limit=2,
                                      max_new_tokens=4, output=str(runs / "x.json")))
