"""PPO from a reward model: per-token rewards, the clipped value loss, the adaptive KL
coefficient, reward-model scores of padded rows, and one update on a tiny model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.parallel import sharding
from jaxlm.run import config as config_lib
from jaxlm.run import program as program_lib
from jaxlm.run.checkpoint import Checkpointer
from jaxlm.scaling import flops as scaling
from jaxlm.stages import ppo
from jaxlm.stages.rl.prompts import make_prompt_iterator
from jaxlm.stages.rl.reward_model import sequence_scores
from tests.rl_fixtures import CharTokenizer, grpo_config, reward_config


def test_token_rewards_match_a_direct_computation():
    rng = np.random.default_rng(0)
    old, ref = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    lengths = np.array([5, 2, 0])
    mask = (np.arange(5) < lengths[:, None]).astype(np.float64)
    score, coef = np.array([1.0, -2.0, 3.0]), np.array([0.1, 0.1, 0.1])
    want = -0.1 * (old - ref) * mask
    want[0, 4] += 1.0
    want[1, 1] += -2.0  # the empty completion gets no score term
    got = ppo.token_rewards(*(jnp.asarray(x, jnp.float32) for x in (score, old, ref, mask,
                                                                     coef)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_clipped_value_loss_and_adaptive_kl_against_hand_values():
    v, old, ret = jnp.array([[1.0, 0.0, 0.5]]), jnp.array([[0.5, 0.0, 0.4]]), jnp.array(
        [[0.0, 1.0, 0.5]])
    # V - V_old = 0.5 (clipped to 0.2: 0.7), 0, 0.1 (unclipped)
    want = 0.5 * np.array([[max(1.0, 0.49), 1.0, 0.0]])
    np.testing.assert_allclose(ppo.clipped_value_loss(v, old, ret, 0.2), want, rtol=1e-6)
    assert ppo.adaptive_kl(0.1, 12.0, target=6.0, horizon=100, batch=10) == pytest.approx(
        0.1 * (1 + 0.2 * 0.1))
    assert ppo.adaptive_kl(0.1, 5.4, target=6.0, horizon=100, batch=10) == pytest.approx(
        0.1 * (1 - 0.1 * 0.1))


def test_value_lr_scale_multiplies_only_the_value_heads_updates():
    import optax
    from ml_collections import ConfigDict

    params = {"reward_head": jnp.ones(3), "layer_0": {"w": jnp.ones((2, 2))}}
    grads = jax.tree.map(jnp.ones_like, params)
    config = ConfigDict({"ppo": {"value_lr_scale": 30.0}})
    tx = ppo.wrap_optimizer(config, optax.sgd(0.1))
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["reward_head"], -3.0 * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(updates["layer_0"]["w"], -0.1 * np.ones((2, 2)), rtol=1e-6)
    plain = optax.sgd(0.1)
    assert ppo.wrap_optimizer(ConfigDict({"ppo": {"value_lr_scale": 1.0}}), plain) is plain


def test_explained_variance_against_numpy():
    rng = np.random.default_rng(1)
    v, r = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    mask = (np.arange(5) < np.array([5, 3, 1, 0])[:, None]).astype(np.float64)
    on = mask > 0
    want = 1.0 - np.var((r - v)[on]) / np.var(r[on])
    got = ppo.explained_variance(*(jnp.asarray(x, jnp.float32) for x in (v, r, mask)))
    assert float(got) == pytest.approx(want, rel=1e-4)
    assert float(ppo.explained_variance(jnp.asarray(r), jnp.asarray(r),
                                        jnp.asarray(mask))) == pytest.approx(1.0)


def _setup(tmp_path, num_epochs=1):
    """PPO sampling at temperature 0.7, chat-formatted prompts (the reward model's pairs are
    chat conversations): 26 prompt slots hold the character tokenizer's chat prompt."""
    config = grpo_config("ppo", num_epochs=num_epochs, kl_coef=0.05, temperature=0.7,
                         chat=True, reward_model=str(tmp_path / "rm"))
    config.data.seq_len = 32
    config.init_from.path = "/unused/checkpoints"
    config_lib.validate(config)
    mesh = sharding.make_mesh(config_lib.check_devices(config, 1, 1), devices=jax.devices()[:1])
    # A "reward model": random weights with a random score head, saved as a reward run saves
    # (its config names the reward stage, whose model has the scalar head). It is saved before
    # the PPO Program is built: the Program reads the reward model's architecture from it.
    rm_config = reward_config(config)
    rm_program = program_lib.build(rm_config, mesh)
    rm = rm_program.init_params(jax.random.key(7))
    rm["reward_head"] = jax.random.normal(jax.random.key(8), rm["reward_head"].shape) * 0.5
    ckpt = Checkpointer(str(tmp_path / "rm"), save_every=1, keep_last=1, async_save=False)
    ckpt.save(1, rm_program.state_from_params(rm), config=rm_config)
    ckpt.close()
    return program_lib.build(config, mesh), rm


@pytest.fixture(scope="module")
def ppo_host(tmp_path_factory):
    program, rm = _setup(tmp_path_factory.mktemp("ppo"), num_epochs=2)
    return program, rm, program.make_loop(CharTokenizer())  # restores rl.reward_model


@pytest.mark.slow
def test_ppo_program_holds_the_rollout_and_the_reward_models_scoring(ppo_host):
    """A step's FLOPs: two epochs of updates, the reference's and the rollout values' forwards,
    the rollout, and the reward model's forward over every row (score head, no vocab head)."""
    program, _, _ = ppo_host
    assert sorted(program.programs) == ["eval_rollout", "reward_score", "rollout"]
    rows, s = 8 * 4, 32
    count = functools.partial(scaling.train_flops_per_token, program.model_cfg, s)
    forward = functools.partial(scaling.forward_flops_per_token, program.model_cfg, s)
    assert program.train_step_flops == pytest.approx((2 * count() + 2 * forward()) * s * rows)
    score = program.programs["reward_score"]
    assert score.flops == pytest.approx(forward(vocab_head=False) * s * rows)
    assert program.flops_per_step == pytest.approx(
        program.train_step_flops + program.programs["rollout"].flops + score.flops)


@pytest.mark.slow
def test_reward_model_is_restored_and_scores_padded_rows_like_unpadded(ppo_host):
    program, rm, host = ppo_host
    tok = CharTokenizer()
    for a, b in zip(jax.tree.leaves(host.reward_model.params), jax.tree.leaves(rm)):
        np.testing.assert_array_equal(a, b)
    batch = next(make_prompt_iterator(program.config, tok, split="train", batch_size=8))
    rolled = host.generate(rm, batch, rng=jax.random.key(0), greedy=True)
    tokens = np.concatenate([rolled["prompt"], rolled["completion"][:, 0]], axis=1)
    lengths = rolled["lengths"][:, 0]
    valid = np.concatenate([rolled["prompt_valid"],
                            np.arange(6) < lengths[:, None]], axis=1).astype(np.int32)
    assert (rolled["prompt_valid"].sum(1) < rolled["prompt"].shape[1]).all()  # padded rows
    scores = sequence_scores(rm, jnp.asarray(tokens), jnp.asarray(valid),
                             jnp.asarray(lengths), 6, model=program.model)
    for i in range(4):
        alone = tokens[i][valid[i] > 0][None]
        want = jax.jit(program.model.apply)({"params": rm}, jnp.asarray(alone))[0, -1]
        assert float(scores[i]) == pytest.approx(float(want), rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_reward_model_reads_a_rollout_where_its_training_read_the_pair(ppo_host, tmp_path):
    """Trained on chat pairs and used on chat-formatted rollouts, the reward model reads both
    at the same token: the answer's end marker, the row's last real token (as TRL's reward
    trainer and PPO do). A completion equal to a pair's chosen answer, stopped by the end
    marker, gets exactly the score training gave that answer."""
    import json

    from jaxlm.data.chat import special_ids, template_from_config
    from jaxlm.data.tasks import split_examples
    from jaxlm.models import Transformer
    from jaxlm.stages import reward
    from jaxlm.stages.rl import reward_model
    from jaxlm.stages.rl.prompts import prompt_length, tokenize_prompts
    from jaxlm.stages.rl.rollout import sequences

    program, rm, host = ppo_host
    tok, config = CharTokenizer(), program.config
    template = template_from_config(config.chat)
    end_id = special_ids(tok, template)[1]
    assert end_id in host.stop  # a chat completion ends where its answer turn closes
    examples = split_examples(config, "train")[:8]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": e["prompt"], "chosen": e["answer"],
                                        "rejected": e["answer"] + "1"}) + "\n"
                            for e in examples))
    rc = reward_config(config)
    rc.reward.update(paths=str(path), eval_paths=str(path))
    pair_batch = next(reward.STAGE.make_data(rc, tok, split="eval", batch_size=8,
                                             process_index=0, process_count=1, cache_dir=""))
    model = Transformer(reward_model.model_config(program))
    trained_Bx2, _ = reward.sequence_rewards(rm, {k: jnp.asarray(v) for k, v in
                                                  pair_batch.items()}, model=model)
    # The same examples as rollout rows: the run's prompt rows, the chosen answer completed.
    prompts = tokenize_prompts(examples, tok, prompt_length(config), template)
    completion = np.zeros((8, 1, 6), np.int32)
    lengths = np.zeros((8, 1), np.int32)
    for i, e in enumerate(examples):
        ids = tok.encode(e["answer"]) + [end_id]
        completion[i, 0, :len(ids)], lengths[i, 0] = ids, len(ids)
    seqs = sequences(np.stack([p["prompt"] for p in prompts]),
                     np.stack([p["prompt_valid"] for p in prompts]), completion, lengths)
    used = host.reward_model.score(seqs, lengths)[:, 0]
    np.testing.assert_allclose(used, np.asarray(trained_Bx2)[:, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ppo_step_trains_policy_and_value_head(ppo_host):
    program, rm, _ = ppo_host
    tok = CharTokenizer()
    params = program.init_params(jax.random.key(0))
    reference = jax.tree.map(jnp.copy, params)
    state = program.state_from_params(params)
    host = ppo.PpoLoop(program, tok, program.extra_args(reference, None), reward_params=rm)
    it = make_prompt_iterator(program.config, tok, split="train", batch_size=8)
    state, m1 = host.train(state, next(it))
    assert m1["value_mean"] == 0.0  # the value head starts at zero
    # The policy is the reference: pi_old (sampled at T) and ref (read at T) agree.
    assert m1["kl"] == pytest.approx(0.0, abs=1e-5)
    assert m1["sequence_kl"] == pytest.approx(0.0, abs=1e-4)
    assert m1["clip_fraction"] > 0  # the second epoch's ratios moved
    assert np.abs(np.asarray(state.params["reward_head"])).max() > 0
    state, m2 = host.train(state, next(it))
    assert m2["value_mean"] != 0.0 and m2["kl"] != 0.0
    for k in ("loss", "value_loss", "entropy", "reward_mean", "rollout_tokens_per_sec",
              "rollout_fraction"):
        assert np.isfinite(m2[k]), k
    # Throughput and MFU are the trainer's, from the Program's counts, for every stage.
    assert "tokens_per_sec" not in m2 and "mfu" not in m2


def test_eval_scores_the_greedy_heldout_completions_with_the_reward_model(ppo_host):
    """eval_score_mean is the reward model's mean score of the greedy held-out completions,
    read at each row's last real token as a padded-free row would be scored."""
    program, rm, host = ppo_host
    tok = CharTokenizer()
    params = program.init_params(jax.random.key(3))
    batch = next(make_prompt_iterator(program.config, tok, split="eval", batch_size=8))
    sums = host.eval(params, batch)
    rolled = host.generate(params, batch, rng=jax.random.key(0), greedy=True)
    want = 0.0
    for i in range(8):
        n = int(rolled["lengths"][i, 0])
        row = np.concatenate([rolled["prompt"][i][rolled["prompt_valid"][i] > 0],
                              rolled["completion"][i, 0, :n]])
        want += float(jax.jit(program.model.apply)({"params": rm}, jnp.asarray(row[None]))[0, -1])
    assert sums["count"] == 8
    assert sums["score_sum"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    metrics = ppo.STAGE.eval_metrics({**sums, "count": 16.0, "score_sum": 4.0})
    assert metrics["eval_score_mean"] == pytest.approx(0.25)
    assert {"eval_accuracy", "eval_reward_mean"} <= set(metrics)


def test_value_warmup_loss_trains_the_value_head_alone(ppo_host):
    """policy_on False (ppo.value_warmup_steps): the loss is value_coef times the value loss
    and only the value head gets a gradient; policy_on True: the trunk gets one too."""
    program, _, _ = ppo_host
    params = program.init_params(jax.random.key(4))
    params["reward_head"] = jax.random.normal(jax.random.key(5), params["reward_head"].shape)
    rng = np.random.default_rng(2)
    n, s, t = 6, program.config.data.seq_len, program.config.rl.max_new_tokens
    mask = (np.arange(t) < rng.integers(1, t + 1, size=n)[:, None]).astype(np.float32)
    batch = {"tokens": jnp.asarray(rng.integers(4, 20, size=(n, s)), jnp.int32),
             "valid": jnp.ones((n, s), jnp.int32), "mask": jnp.asarray(mask),
             "weights": jnp.asarray(mask / mask.sum()),
             **{k: jnp.asarray(rng.normal(size=(n, t)), jnp.float32)
                for k in ("old_logps", "adv", "returns", "old_values")}}
    loss = functools.partial(ppo.loss_fn, batch=batch, lm=ppo.language_model(program.model),
                             clip_low=0.2, clip_high=0.2, value_clip=0.2, value_coef=0.5,
                             total_rows=n)
    for on in (False, True):
        (value, aux), grads = jax.value_and_grad(
            lambda p, on=on: loss(p, policy_on=jnp.asarray(on)), has_aux=True)(params)
        trunk = [float(np.abs(np.asarray(g)).max()) for k, sub in grads.items()
                 if k != "reward_head" for g in jax.tree.leaves(sub)]
        assert np.abs(np.asarray(grads["reward_head"])).max() > 0
        assert (max(trunk) > 0) == on
        if not on:
            assert float(value) == pytest.approx(0.5 * float(aux["value_loss_sum"]), rel=1e-5)


def test_group_mean_baseline_rewards_each_completion_against_its_prompts_others(
        ppo_host, monkeypatch):
    """ppo.score_baseline='group_mean': the update's score is the reward model's minus the mean
    of the same prompt's completions (the same rollout: the step's key draws it); with
    ppo.score_transform='sigmoid' the sigmoid of the score minus the prompt's mean of that."""
    program, _, host = ppo_host
    tok = CharTokenizer()
    state = program.state_from_params(program.init_params(jax.random.key(6)))
    batch = next(make_prompt_iterator(program.config, tok, split="train", batch_size=8))
    seen = []
    monkeypatch.setattr(host, "update", lambda st, arrays: (seen.append(arrays) or st, {}))
    host.train(state, batch)
    monkeypatch.setattr(program.config.ppo, "score_baseline", "group_mean")
    host.train(state, batch)
    monkeypatch.setattr(program.config.ppo, "score_transform", "sigmoid")
    host.train(state, batch)
    plain, centred, squashed = (x["score"] for x in seen)
    assert plain.shape == (8, 4) and np.std(plain) > 0
    np.testing.assert_allclose(centred, plain - plain.mean(axis=1, keepdims=True), atol=1e-5)
    prob = 1.0 / (1.0 + np.exp(-plain.astype(np.float64)))
    np.testing.assert_allclose(squashed, prob - prob.mean(axis=1, keepdims=True), atol=1e-6)


def test_sigmoid_score_saturates_without_overflow():
    score = np.array([[-1000.0, -10.0, 0.0, 3.0, 1000.0]])
    got = ppo.score_reward(score, transform="sigmoid", baseline="none")
    np.testing.assert_allclose(got, [[0.0, 4.54e-5, 0.5, 0.952574, 1.0]], rtol=1e-3, atol=1e-7)
    assert np.isfinite(got).all()


@pytest.mark.slow
def test_rejection_ranks_by_the_reward_model_when_given(ppo_host):
    """rl.reward_model: the kept completion of each prompt is the one the model scores best."""
    from jaxlm.stages import rejection

    program, rm, ppo_host_ = ppo_host
    config = grpo_config("rejection", reward_model=program.config.rl.reward_model,
                         keep_min_reward=-1e9, chat=True)
    config.data.seq_len = 32
    config_lib.validate(config)
    rs_program = program_lib.build(config, program.mesh)
    host = rs_program.make_loop(CharTokenizer())
    for a, b in zip(jax.tree.leaves(host.reward_model.params), jax.tree.leaves(rm)):
        np.testing.assert_array_equal(a, b)
    batch = next(make_prompt_iterator(config, CharTokenizer(), split="train", batch_size=8))
    rolled = host.generate(rs_program.init_params(jax.random.key(2)), batch, rng=jax.random.key(1))
    seqs = rejection.sequences(rolled["prompt"], rolled["prompt_valid"], rolled["completion"],
                               rolled["lengths"])
    scores = host.reward_model.score(seqs, rolled["lengths"])
    np.testing.assert_allclose(scores, ppo_host_.reward_model.score(seqs, rolled["lengths"]))
    rows = rejection.best_of_group(rolled, scores, -1e9)
    best = np.argmax(scores, axis=1)
    np.testing.assert_array_equal(rows["tokens"][:, -6:],
                                  rolled["completion"][np.arange(8), best])
