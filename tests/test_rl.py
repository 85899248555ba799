"""GRPO and its pieces on tiny models: advantages, objectives, GAE, rollouts, a sharded step,
and the reward of the arithmetic task going up from a warmed-up policy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.data import tasks
from jaxlm.losses import policy as objectives
from jaxlm.parallel import sharding
from jaxlm.run import config as config_lib
from jaxlm.run import program as program_lib
from jaxlm.scaling import flops as scaling
from jaxlm.stages import get_stage, grpo
from jaxlm.stages.rl import advantages, rewards
from jaxlm.stages.rl.loop import place
from jaxlm.stages.rl.prompts import make_prompt_iterator
from jaxlm.stages.rl.rollout import sequence_logps
from tests.rl_fixtures import CharTokenizer, grpo_config
from tests.rl_warmup import rewards_after_warm_up, warm_up


def _program(config, devices: int):
    config_lib.validate(config)
    mesh = sharding.make_mesh(config_lib.check_devices(config, devices, 1),
                              devices=jax.devices()[:devices])
    return program_lib.build(config, mesh)


# -- advantages, normalisations, objectives -------------------------------------------------

def test_group_advantages_match_numpy():
    r = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    r[2] = 1.5  # a group with one value: zero advantages, no division by zero
    want = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(advantages.group_advantages(r, "std"), want, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(advantages.group_advantages(r, "none"),
                               r - r.mean(1, keepdims=True), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(advantages.group_advantages(r, "std"))[2], 0.0)


def test_sample_std_advantages_are_trls():
    """rl.advantage_scale="sample_std": TRL's GRPOTrainer, (r - mean) / (sample std + 1e-4)
    with Bessel's correction (torch's default std)."""
    r = np.random.default_rng(4).normal(size=(5, 6)).astype(np.float32)
    r[3] = -0.5
    want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    got = np.asarray(advantages.group_advantages(r, "sample_std"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[3], 0.0)
    assert config_lib.base_config().rl.advantage_scale == "std"  # the stated default


def test_grpo_refuses_a_group_of_one():
    """One completion per prompt has advantage 0: GRPO would train nothing."""
    with pytest.raises(ValueError, match=r"^config key rl.group_size: grpo compares "):
        config_lib.validate(grpo_config(group_size=1))
    config_lib.validate(grpo_config("rejection", group_size=1))  # best of one is fine


def test_token_weights_match_direct_sums():
    lengths = np.array([3, 1, 5, 0])
    mask = (np.arange(5) < lengths[:, None]).astype(np.float32)
    x = np.random.default_rng(1).normal(size=mask.shape).astype(np.float32)

    def loss(norm):
        return float(np.sum(objectives.token_weights(mask, norm) * x))

    per_seq = [x[i, :n].mean() for i, n in enumerate(lengths) if n] + [0.0]
    assert loss("sequence") == pytest.approx(np.sum(per_seq) / 4, rel=1e-5)
    assert loss("token") == pytest.approx(np.sum(x * mask) / lengths.sum(), rel=1e-5)
    assert loss("constant") == pytest.approx(np.sum(x * mask) / (4 * 5), rel=1e-5)


def test_clipped_surrogate_and_k3_against_hand_values():
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.1, 0.7]]))  # ratios with old_logp = 0
    adv = jnp.array([[1.0, -1.0, 2.0, 1.0]])
    loss, clipped = objectives.clipped_surrogate(logp, jnp.zeros_like(logp), adv, clip_low=0.2,
                                                 clip_high=0.3)
    # min(1.5*1, 1.3*1)=1.3; min(-0.5, -0.8)=-0.8; min(2.2, 2.2)=2.2; min(0.7, 0.8)=0.7
    np.testing.assert_allclose(loss, -np.array([[1.3, -0.8, 2.2, 0.7]]), rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[True, True, False, False]])
    kl = objectives.k3_kl(jnp.log(jnp.array([0.5, 0.25])), jnp.log(jnp.array([0.25, 0.25])))
    # exp(d) - d - 1 with d = log(ref / p): d = log 0.5 and 0.
    np.testing.assert_allclose(kl, [0.5 - np.log(0.5) - 1.0, 0.0], rtol=1e-6, atol=1e-7)


def test_gae_matches_a_reference_loop():
    rng = np.random.default_rng(2)
    rew, val = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    lengths, gamma, lam = [7, 4, 1], 0.9, 0.8
    mask = (np.arange(7) < np.array(lengths)[:, None]).astype(np.float64)
    want = np.zeros_like(rew)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_v = val[b, t + 1] if t + 1 < n else 0.0
            last = rew[b, t] + gamma * next_v - val[b, t] + gamma * lam * last
            want[b, t] = last
    adv, ret = advantages.gae(jnp.asarray(rew, jnp.float32), jnp.asarray(val, jnp.float32),
                              jnp.asarray(mask), gamma=gamma, lam=lam)
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, (want + val) * mask, rtol=1e-5, atol=1e-5)


def test_rewards_and_task_split():
    ex = {"prompt": "3+4=", "answer": "7"}
    assert rewards.correct("", " 7", ex) == 1.0 and rewards.correct("", "07x", ex) == 0.0
    assert rewards.format_integer("", "12", ex) == 1.0
    assert rewards.format_integer("", "1 2", ex) == 0.0
    config = grpo_config()
    train, held = tasks.split_examples(config, "train"), tasks.split_examples(config, "eval")
    assert len(train) + len(held) == 2 * 5 * 5 and len(held) == 10
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in held}
    assert held == tasks.split_examples(grpo_config(), "eval")  # no seed involved
    for e in train:
        assert eval(e["prompt"][:-1]) == int(e["answer"])  # noqa: S307


def test_check_rl_names_the_key():
    for key, value in [("group_size", 0), ("loss_norm", "mean"), ("rewards", "nope:1"),
                       ("max_new_tokens", 14), ("clip_eps", 0.0)]:
        c = grpo_config(**{key: value})
        with pytest.raises(ValueError, match=f"config key rl.{key}"):
            config_lib.validate(c)
    with pytest.raises(ValueError, match="config key init_from.path"):
        config_lib.validate(grpo_config(kl_coef=0.1))


def test_rl_keys_have_one_home_and_the_old_names_say_the_new_one():
    """One `rl` section, declared once and read by the three RL stages; PPO-only keys in `ppo`;
    a config setting a key by its old name fails with one line naming the new one."""
    rl = get_stage("grpo").sections[0]
    assert rl.name == "rl" and get_stage("rejection").sections == (rl,)
    assert [s.name for s in get_stage("ppo").sections] == ["rl", "ppo"]
    assert get_stage("ppo").sections[0] is rl
    for old, new, value in [("ppo.kl_coef", "rl.kl_coef", 0.1),
                            ("ppo.reward_model", "rl.reward_model", "/rm"),
                            ("rl.gamma", "ppo.gamma", 0.9), ("rl.lam", "ppo.lam", 0.9)]:
        c = grpo_config("ppo")
        section, key = old.split(".")
        c[section][key] = value
        with pytest.raises(ValueError, match=f"^config key {old}: renamed to {new}$"):
            config_lib.validate(c)


def test_program_counts_every_group_member_epoch_and_the_rollout():
    """The Program holds the jitted rollouts with their FLOPs; a step's FLOPs (what MFU divides
    by) are the update's (3 epochs + the reference's forward) plus the training rollout's."""
    config = grpo_config(num_epochs=3, kl_coef=0.1)
    config.init_from.path = "/unused/checkpoints"
    program = _program(config, 1)
    assert program.uses_reference and program.eval_step is None
    count = functools.partial(scaling.train_flops_per_token, program.model_cfg, 14)
    forward = count(reference_forwards=1) - count()
    rows = 8 * 4  # prompts x group
    assert program.train_step_flops == pytest.approx((3 * count() + forward) * 14 * rows)
    # The rollout: 8 prompt + 6 decode tokens for each of the B x G rows, forward only.
    rollout, held_out = program.programs["rollout"], program.programs["eval_rollout"]
    assert rollout.per_step and not held_out.per_step
    assert rollout.flops == pytest.approx(forward * 14 * rows)
    assert held_out.flops == pytest.approx(forward * 14 * 8)  # one greedy completion a prompt
    assert program.flops_per_step == pytest.approx(program.train_step_flops + rollout.flops)
    assert program.tokens_per_step == 14 * rows
    # Its abstract inputs are one global batch of prompts; it lowers without any data.
    assert rollout.abstract_args[1].shape == (8, 8)
    assert "while" in program.lower("rollout").as_text()
    # The schedule spans every optimizer update: 20 steps x 3 epochs.
    assert float(program.lr_schedule(60)) == pytest.approx(
        config.optim.learning_rate * config.optim.min_lr_ratio, rel=1e-5)


# -- rollouts and steps on the tiny model ---------------------------------------------------

TEMPERATURE = 0.7


def direct_logps(model, params, tokens_NxS, valid_NxS, num_new, temperature):
    """log softmax(logits / T) of each row's last `num_new` tokens, and the entropy of that
    distribution, from the model's full logits (no chunking, no fused head)."""
    valid = np.asarray(valid_NxS, np.int32)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    logits = model.apply({"params": params}, jnp.asarray(tokens_NxS), positions_BxL=positions,
                         segment_ids_BxL=valid)
    logp_NxTxV = jax.nn.log_softmax(logits[:, -num_new - 1:-1] / temperature, axis=-1)
    targets = jnp.asarray(tokens_NxS)[:, -num_new:, None]
    entropy = -jnp.sum(jnp.exp(logp_NxTxV) * logp_NxTxV, axis=-1)
    return np.asarray(jnp.take_along_axis(logp_NxTxV, targets, -1)[..., 0]), np.asarray(entropy)


@pytest.fixture(scope="module")
def rolled_out():
    """A 1-device program, a warmed-up policy, one rollout batch (sampled at temperature
    0.7) and its update arrays."""
    tok = CharTokenizer()
    config = grpo_config(num_epochs=2, temperature=TEMPERATURE)
    program = _program(config, 1)
    host = program.make_loop(tok)
    assert isinstance(host, grpo.GrpoLoop)
    params = warm_up(program, program.init_params(jax.random.key(0)), tok, steps=30)
    batch = next(make_prompt_iterator(config, tok, split="train", batch_size=8))
    rolled = host.generate(params, batch, rng=jax.random.key(3))
    rew, _, _, _ = host.rewards(rolled, "train")
    arrays = grpo.update_batch(rolled, rew, scale="std", loss_norm="sequence")
    return program, host, params, rolled, arrays


@pytest.mark.slow
def test_rollout_logps_are_those_of_the_tempered_distribution_it_samples(rolled_out):
    """The kept log-probs are log softmax(z / T) of the sampling temperature (as TRL's), equal
    to the training forward's at T and to a direct computation from the model's logits."""
    program, _, params, rolled, arrays = rolled_out
    assert rolled["lengths"].min() >= 1 and rolled["completion"].shape == (8, 4, 6)
    flat = {k: v.reshape(32, -1) for k, v in arrays.items() if k != "advantages"}
    want, _ = direct_logps(program.model, params, flat["tokens"], flat["valid"], 6, TEMPERATURE)
    np.testing.assert_allclose(flat["old_logps"], want * flat["mask"], atol=2e-5)
    logp = sequence_logps(params, jnp.asarray(flat["tokens"]), jnp.asarray(flat["valid"]), 6,
                          model=program.model, temperature=TEMPERATURE)
    np.testing.assert_allclose(np.asarray(logp) * flat["mask"], flat["old_logps"], atol=2e-5)
    assert np.all(flat["old_logps"][flat["mask"] == 0] == 0)


@pytest.mark.slow
def test_grpo_step_reads_every_log_prob_at_the_sampling_temperature(rolled_out):
    """The train step's ratio, k3 KL and entropy are of softmax(z / T): at the first epoch the
    ratio is 1 (the loss is -sum w A), and kl and entropy equal direct computations at T
    against a reference that differs from the policy."""
    _, _, params, _, arrays = rolled_out
    config = grpo_config(num_epochs=1, temperature=TEMPERATURE, kl_coef=0.1)
    config.init_from.path = "/unused/checkpoints"
    program = _program(config, 1)
    reference = program.init_params(jax.random.key(5))
    flat = {k: v.reshape(32, *v.shape[2:]) for k, v in arrays.items()}
    logp, entropy = direct_logps(program.model, params, flat["tokens"], flat["valid"], 6,
                                 TEMPERATURE)
    ref, _ = direct_logps(program.model, reference, flat["tokens"], flat["valid"], 6,
                          TEMPERATURE)
    mask = flat["mask"]
    want_kl = np.sum((np.exp(ref - logp) - (ref - logp) - 1) * mask) / mask.sum()
    state = program.state_from_params(jax.device_put(params, program.reference_shardings))
    _, metrics = program.train_step(state, place(arrays, program.mesh), reference)
    metrics = jax.device_get(metrics)
    assert float(metrics["kl"]) == pytest.approx(want_kl, rel=1e-4)
    assert float(metrics["entropy"]) == pytest.approx(np.sum(entropy * mask) / mask.sum(),
                                                      rel=1e-4)
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    want_loss = np.sum(flat["weights"] * (-flat["advantages"][:, None] + 0.1 * k3))
    assert float(metrics["loss"]) == pytest.approx(want_loss, abs=1e-5)


@pytest.mark.slow
def test_first_epoch_ratio_is_one_and_clipping_changes_nothing(rolled_out):
    program, _, params, _, arrays = rolled_out
    flat = {k: jnp.asarray(v.reshape(32, *v.shape[2:])) for k, v in arrays.items()}

    def loss(clip):
        fn = functools.partial(grpo.loss_fn, model=program.model, clip_low=clip,
                               clip_high=clip, kl_coef=0.0, total_rows=32,
                               temperature=TEMPERATURE)
        return jax.value_and_grad(lambda p: fn(p, flat)[0])(params), fn(params, flat)[1]

    (clipped, g_clipped), sums = loss(0.2)
    (unclipped, g_unclipped), _ = loss(1e6)
    assert float(sums["clipped_sum"]) == 0.0
    assert float(clipped) == pytest.approx(float(unclipped), rel=1e-6, abs=1e-7)
    for a, b in zip(jax.tree.leaves(g_clipped), jax.tree.leaves(g_unclipped)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The objective at ratio 1 is -sum_t w_t A: zero-mean advantages give ~0 per group.
    want = -np.sum(arrays["weights"] * arrays["advantages"][..., None])
    assert float(clipped) == pytest.approx(want, abs=1e-5)


@pytest.mark.slow
def test_sharded_grpo_step_equals_unsharded(rolled_out):
    program1, _, params, _, arrays = rolled_out
    config = grpo_config(num_epochs=2, temperature=TEMPERATURE)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    outs = []
    for program in (program1, _program(config, 8)):
        state = program.state_from_params(jax.device_put(params, program.reference_shardings))
        new, metrics = program.train_step(state, place(arrays, program.mesh))
        outs.append((jax.device_get(new.params), jax.device_get(metrics), int(new.step)))
    (p1, m1, s1), (p8, m8, s8) = outs
    assert s1 == s8 == 1
    for k in ("entropy", "clip_fraction", "grad_norm"):
        assert float(m1[k]) == pytest.approx(float(m8[k]), rel=1e-4, abs=1e-6), k
    assert float(m1["clip_fraction"]) > 0  # the second epoch's ratios moved
    # Adam's first steps move every weight by ~lr = 3e-3; summation order differs by far less.
    moved = max(float(np.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(p1), jax.tree.leaves(jax.device_get(params))))
    assert moved > 3e-3
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_rollouts_decode_in_the_training_precision_under_an_int8_kv_cache():
    """model.kv_cache_dtype="int8" serves inference; an RL rollout keeps the cache in the
    training precision, so its log-probs are the train step's (first-epoch ratio 1)."""
    tok = CharTokenizer()
    config = grpo_config(temperature=TEMPERATURE)
    config.model.kv_cache_dtype = "int8"
    program = _program(config, 1)
    host = program.make_loop(tok)
    params = program.init_params(jax.random.key(11))
    params = jax.tree.map(lambda x: x * 4.0, params)  # sharp logits: cache rounding shows
    batch = next(make_prompt_iterator(config, tok, split="train", batch_size=8))
    rolled = host.generate(params, batch, rng=jax.random.key(3))
    rew, _, _, _ = host.rewards(rolled, "train")
    flat = {k: v.reshape(32, -1) for k, v in
            grpo.update_batch(rolled, rew, scale="std", loss_norm="sequence").items()
            if k != "advantages"}
    want, _ = direct_logps(program.model, params, flat["tokens"], flat["valid"], 6, TEMPERATURE)
    np.testing.assert_allclose(flat["old_logps"], want * flat["mask"], atol=2e-5)


@pytest.mark.slow
def test_reward_goes_up_on_arithmetic_from_a_warmed_up_policy():
    """40 GRPO steps (16 prompts x 8 completions) after 60 supervised warm-up steps: the mean
    exact-answer reward of the last 8 steps beats that of the first 8. The one learning check
    among the tests (a minute on CPU); the held-out learning runs of grpo, rejection and ppo
    are commands with their figures in docs/rl.md."""
    tok = CharTokenizer()
    config = grpo_config()
    config.train.global_batch_size, config.rl.group_size = 16, 8
    config.optim.learning_rate = 5e-4
    program = _program(config, 1)
    history = rewards_after_warm_up(program, program.make_loop(tok), tok, rounds=40)
    for metrics in history:
        assert metrics["rollout_tokens_per_sec"] > 0 and 0 < metrics["rollout_fraction"] < 1
    correct = [m["reward_correct"] for m in history]
    assert np.mean(correct[-8:]) > np.mean(correct[:8]) + 0.04, np.round(correct, 2)
