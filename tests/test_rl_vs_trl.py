"""benchmarks/rl_vs_trl.py's mapping of a jaxlm GRPO run onto TRL's GRPOTrainer (no TRL
needed): its settings, learning-rate schedule, rewards and evaluator."""

import importlib.util
import os

import numpy as np
import pytest

from jaxlm.run.optim import learning_rate_schedule
from jaxlm.stages.rl.rewards import total_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "rl_vs_trl", os.path.join(ROOT, "benchmarks", "rl_vs_trl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CharTokenizer:
    """Ids 10.. are the characters of ALPHABET; 3 and 5 are stop ids."""

    ALPHABET = "0123456789-+= x"

    def decode(self, ids):
        return "".join(self.ALPHABET[i - 10] for i in ids)

    def encode(self, text):
        return [self.ALPHABET.index(ch) + 10 for ch in text]


def test_settings_follow_the_jaxlm_config(bench, tmp_path):
    c = bench.grpo_config(str(tmp_path), 120, 7)
    c.rl.num_epochs = 2
    c.rl.clip_eps_high = 0.28
    s = bench.trl_settings(c)
    assert s["num_generations"] == c.rl.group_size
    assert s["per_device_train_batch_size"] == c.train.global_batch_size * c.rl.group_size
    assert (s["num_iterations"], s["max_steps"]) == (2, 240)
    assert (s["epsilon"], s["epsilon_high"], s["beta"]) == (c.rl.clip_eps, 0.28, c.rl.kl_coef)
    assert (s["loss_type"], s["scale_rewards"]) == ("dapo", "group")
    assert s["use_bias_correction_kl"] is False
    assert s["reward_weights"] == [1.0, 0.1]
    assert (s["seed"], s["max_completion_length"]) == (7, c.rl.max_new_tokens)
    for norm, loss_type in (("sequence", "grpo"), ("constant", "dr_grpo")):
        c.rl.loss_norm = norm
        assert bench.trl_settings(c)["loss_type"] == loss_type


def test_settings_refuse_what_trl_cannot_match(bench, tmp_path):
    c = bench.grpo_config(str(tmp_path), 10, 0)
    c.rl.advantage_scale = "std"  # TRL has no population std
    with pytest.raises(ValueError, match="rl.advantage_scale"):
        bench.trl_settings(c)
    c.rl.advantage_scale = "none"
    c.optim.weight_decay = 0.1
    with pytest.raises(ValueError, match="optim.weight_decay"):
        bench.trl_settings(c)


def test_transformers_schedule_equals_jaxlm_schedule(bench, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    c = bench.grpo_config(str(tmp_path), 200, 0)
    s = bench.trl_settings(c)
    total = s["max_steps"]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=s["learning_rate"])
    sched = transformers.get_scheduler(s["lr_scheduler_type"], opt, s["warmup_steps"], total,
                                       scheduler_specific_kwargs=s["lr_scheduler_kwargs"])
    ours = learning_rate_schedule(c.optim, total)
    theirs = []
    for _ in range(total):
        theirs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    np.testing.assert_allclose(theirs, [float(ours(i)) for i in range(total)], rtol=1e-5,
                               atol=1e-10)


def test_rewards_score_as_jaxlm_does(bench):
    tok = CharTokenizer()
    funcs = bench.trl_rewards("correct:1.0,format:0.1", tok, stop=[3, 5])
    texts = ["7", "-3", "7 x", "12", ""]
    ids = [tok.encode(t) + [5] for t in texts[:3]] + [tok.encode(texts[3]), [3]]
    answers = ["7", "-3", "7", "1", "0"]
    prompts = ["3+4=", "0-3=", "2+5=", "1+0=", "0+0="]
    got = [f(prompts=None, completions=None, completion_ids=ids, answer=answers,
             prompt_text=prompts) for f in funcs]
    weights = [("correct", 1.0), ("format", 0.1)]
    for i, (p, t, a) in enumerate(zip(prompts, texts, answers)):
        want = total_reward(weights, p, t, {"prompt": p, "answer": a})
        assert got[0][i] * 1.0 + got[1][i] * 0.1 == pytest.approx(want[0])
    assert got[0] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert got[1] == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_evaluator_stops_and_scores_greedy_answers(bench):
    torch = pytest.importorskip("torch")
    tok = CharTokenizer()

    class Model:  # "generates" a fixed continuation per row
        def generate(self, ids, **kwargs):
            assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 4
            new = [tok.encode("7") + [5, 10, 10], tok.encode("12") + [3, 11],
                   tok.encode("4444")]
            return torch.cat([ids, torch.tensor(new)], 1)

    prompts = [[2, 1, 1]] * 3
    examples = [{"prompt": "x", "answer": a} for a in ("7", "1", "4444")]
    out = bench.heldout_accuracy(Model(), prompts, examples, tok, [3, 5], 4)
    assert out["answers"] == ["7", "12", "4444"]
    assert out["accuracy"] == pytest.approx(2 / 3)
