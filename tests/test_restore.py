"""jaxlm/weights/restore.py, the one way to restore a model from a checkpoint: a run on its
tokenizer's vocabulary exports to Hugging Face with jaxlm's logits, an export reads a run whose
trainer is still saving without disturbing it, a reward model of its own shape scores rollouts,
LoRA adapters merge on restore, and only the trainer's Checkpointer and the params writer open
orbax for writing."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxlm.models import Transformer, lora
from jaxlm.parallel import sharding
from jaxlm.run import checkpoint, trainer
from jaxlm.run import config as config_lib
from jaxlm.run import program as program_lib
from jaxlm.stages.rl import reward_model as reward_model_lib
from jaxlm.stages.rl.reward_model import RewardModel
from jaxlm.weights import restore
from jaxlm.weights.hf import convert as hf
from jaxlm.weights.write import write_params_checkpoint
from tests.cli import xla_flags
from tests.rl_fixtures import CharTokenizer, grpo_config, reward_config
from tests.run_fixtures import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny pretraining run whose config leaves model.vocab_size at 0 (its tokenizer's)."""
    tmp = tmp_path_factory.mktemp("restore")
    config = tiny_run_config(tmp, num_layers=1, seq_len=16)
    assert config.model.vocab_size == 0
    trainer.run(config, str(tmp / "run"))
    return tmp / "run"


@pytest.mark.slow
def test_a_run_on_its_tokenizers_vocabulary_exports_with_jaxlms_logits(run_dir, tmp_path):
    import torch
    import transformers

    hf.export_hf(str(run_dir / "checkpoints"), str(tmp_path / "hf"))
    r = restore.restore(str(run_dir))
    assert r.config.model.vocab_size == 0
    assert r.model_cfg.vocab_size == r.tokenizer.vocab_size
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokens = np.random.default_rng(0).integers(0, r.model_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        got = exported(torch.tensor(tokens)).logits.numpy()
    want = np.asarray(jax.jit(Transformer(r.model_cfg).apply)({"params": r.params},
                                                              jnp.asarray(tokens)))
    vocab = r.model_cfg.vocab_size
    assert got.shape[-1] == vocab
    np.testing.assert_allclose(got, want[..., :vocab], atol=1e-4, rtol=0)


def test_a_workdir_and_its_checkpoints_directory_name_the_same_checkpoint(run_dir):
    a, b = restore.read_checkpoint(str(run_dir)), restore.read_checkpoint(
        str(run_dir / "checkpoints"))
    assert a.directory == b.directory == str(run_dir / "checkpoints")
    assert a.step == b.step == 2 and a.config == b.config
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        restore.read_checkpoint(str(run_dir / "cache"))


def test_a_changed_tokenizer_file_is_refused(run_dir, tmp_path):
    saved = restore.read_checkpoint(str(run_dir))
    moved = dict(saved.extra, tokenizer_sha256="0" * 64)
    with pytest.raises(ValueError, match="has changed since"):
        restore.saved_tokenizer(restore.SavedRun(saved.directory, saved.step, saved.config,
                                                 moved))


def _saved_run(directory, config, seed):
    """A checkpoint of `config`'s model with random weights (a reward head's too)."""
    cfg = config_lib.model_config(config)
    variables = jax.jit(Transformer(cfg).init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
    params = jax.device_get(nn.meta.unbox(variables["params"]))
    if cfg.reward_head:
        params["reward_head"] = np.asarray(
            jax.random.normal(jax.random.key(seed + 1), params["reward_head"].shape))
    write_params_checkpoint(str(directory), 1, params, config, {})
    return cfg, params


@pytest.mark.slow
def test_a_reward_model_of_its_own_width_and_depth_loads_and_scores(tmp_path):
    policy = grpo_config("ppo", kl_coef=0.0, chat=True)
    policy.init_from.path = "/unused/checkpoints"
    policy.rl.reward_model = str(tmp_path / "rm")
    rm_config = reward_config(policy)
    rm_config.model.update(d_model=48, num_layers=3, num_heads=6, num_kv_heads=3, d_ff=96)
    rm_cfg, rm_params = _saved_run(tmp_path / "rm", rm_config, seed=3)
    assert rm_cfg.reward_head
    config_lib.validate(policy)
    mesh = sharding.make_mesh(config_lib.check_devices(policy, 1, 1), devices=jax.devices()[:1])
    program = program_lib.build(policy, mesh)
    assert (rm_cfg.d_model, rm_cfg.num_layers) != (program.model_cfg.d_model,
                                                   program.model_cfg.num_layers)
    built = reward_model_lib.model_config(program)
    assert (built.d_model, built.num_layers) == (48, 3)

    reward = RewardModel(program, str(tmp_path / "rm"), tokenizer=CharTokenizer())
    for a, b in zip(jax.tree.leaves(reward.params), jax.tree.leaves(rm_params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # Rows of a left-padded prompt (5) and a completion (6 slots), scored at their last token.
    rng = np.random.default_rng(1)
    b, g, prompt, new = 2, 2, 5, policy.rl.max_new_tokens
    tokens = rng.integers(4, CharTokenizer.vocab_size, (b, g, prompt + new)).astype(np.int32)
    lengths = np.array([[6, 2], [0, 4]], np.int32)
    pad = np.array([[0, 1], [2, 0]])
    valid = np.zeros_like(tokens)
    for i in range(b):
        for j in range(g):
            valid[i, j, pad[i, j]:prompt] = 1
            valid[i, j, prompt:prompt + lengths[i, j]] = 1
    scores = reward.score({"tokens": tokens, "valid": valid}, lengths)
    apply = jax.jit(Transformer(rm_cfg).apply)
    for i in range(b):
        for j in range(g):
            alone = tokens[i, j][valid[i, j] > 0][None]
            want = apply({"params": rm_params}, jnp.asarray(alone))[0, -1]
            assert scores[i, j] == pytest.approx(float(want), rel=1e-4, abs=1e-5)

    lm_config = reward_config(policy)
    lm_config.stage = "pretrain"
    _saved_run(tmp_path / "lm", lm_config, seed=5)
    policy.rl.reward_model = str(tmp_path / "lm")
    with pytest.raises(ValueError, match="no scalar reward head"):
        program_lib.build(policy, mesh)


@pytest.mark.slow
def test_lora_adapters_merge_into_the_weights_they_adapt(tmp_path):
    """`merge_lora`: restored in the model's default layout or into given shardings, the merged
    weights are W + (alpha / r) A B of the saved ones."""
    config = grpo_config("pretrain")
    config.model.lora.update(rank=4, alpha=8.0)
    cfg = config_lib.model_config(config)
    variables = jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    flat = traverse_util.flatten_dict(jax.device_get(nn.meta.unbox(variables["params"])),
                                      sep="/")
    flat = {k: (np.random.default_rng(len(k)).normal(size=v.shape).astype(v.dtype)
                if k.endswith(lora.SUFFIX_B) else v) for k, v in flat.items()}
    write_params_checkpoint(str(tmp_path / "lora"), 7, traverse_util.unflatten_dict(flat, sep="/"),
                            config, {})
    name = next(k for k in flat if k.endswith("wq" + lora.SUFFIX_A))[:-len(lora.SUFFIX_A)]
    w, a, b = (flat[name + s] for s in ("", lora.SUFFIX_A, lora.SUFFIX_B))
    stacked = a.ndim - 2
    want = w + 2.0 * np.matmul(a.reshape(*a.shape[:stacked], -1, 4),
                               b.reshape(*b.shape[:stacked], 4, -1)).reshape(w.shape)

    r = restore.restore(str(tmp_path / "lora"), merge_lora=True)
    assert r.model_cfg.lora_rank == 0 and r.config.model.lora.rank == 0 and r.step == 7
    merged = traverse_util.flatten_dict(r.params, sep="/")
    assert not any(k.endswith((lora.SUFFIX_A, lora.SUFFIX_B)) for k in merged)
    np.testing.assert_allclose(np.asarray(merged[name]), want, rtol=1e-5, atol=1e-5)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "pipeline": 1})
    base = restore.inference_abstract(r.model_cfg, mesh)
    into = restore.restore(str(tmp_path / "lora"), model_cfg=r.model_cfg, abstract_params=base,
                           merge_lora=True)
    got = traverse_util.flatten_dict(into.params, sep="/")
    assert got[name].sharding == traverse_util.flatten_dict(base, sep="/")[name].sharding
    np.testing.assert_allclose(np.asarray(got[name]), want, rtol=1e-5, atol=1e-5)


def test_only_the_trainers_checkpointer_and_the_params_writer_write_checkpoints():
    """Readers of a run go through jaxlm.weights.restore: no other module opens an orbax
    checkpointer or manager (which could create, write or tidy the run's directory)."""
    allowed = {"jaxlm/run/checkpoint.py", "jaxlm/weights/write.py",
               "jaxlm/run/trainer.py"}  # the trainer's Checkpointer of its own workdir
    opens = re.compile(r"\b\w*Checkpoint(?:er|Manager)\(")
    found = set()
    for path in (ROOT / "jaxlm").rglob("*.py"):
        if opens.search(path.read_text()):
            found.add(str(path.relative_to(ROOT)))
    assert found <= allowed, sorted(found - allowed)
    assert "jaxlm/weights/write.py" in found  # the pattern does see what it looks for


@pytest.mark.slow
def test_an_export_reads_a_run_whose_trainer_is_still_saving(tmp_path):
    """`convert_hf export` of a live run succeeds while a save of the trainer is in flight (the
    trainer is paused with its `<step>.orbax-checkpoint-tmp` on disk, so the overlap does not
    depend on timing); the in-flight directory survives the export and the trainer, resumed,
    finishes with every checkpoint."""
    steps = 12
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py",
           f"--workdir={workdir}", "--config.model.d_model=32", "--config.model.num_layers=1",
           "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
           "--config.model.d_ff=64", "--config.data.seq_len=16", "--config.data.vocab_size=400",
           "--config.data.max_documents=60", "--config.train.global_batch_size=8",
           f"--config.train.steps={steps}", "--config.eval.every_steps=0",
           "--config.log.sample_every=0", "--config.checkpoint.every_steps=1",
           f"--config.checkpoint.keep_last={steps}", "--config.log.peak_flops=1e11"]
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    directory = workdir / "checkpoints"
    in_flight = None
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while in_flight is None and proc.poll() is None:
                assert time.time() < deadline, "no save of the trainer was seen in 10 minutes"
                tmps = sorted(directory.glob("*.orbax-checkpoint-tmp*")) if directory.is_dir() \
                    else []
                if not tmps or not checkpoint.complete_steps(str(directory)):
                    time.sleep(0.005)
                    continue
                proc.send_signal(signal.SIGSTOP)
                if tmps[0].exists():
                    in_flight = tmps[0]
                    hf.export_hf(str(workdir), str(tmp_path / "hf"))
                    assert in_flight.exists(), "the export removed the trainer's in-flight save"
                proc.send_signal(signal.SIGCONT)
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
    assert rc == 0, (tmp_path / "train.log").read_text()[-3000:]
    assert in_flight is not None, "the run ended before a save of it was seen in flight"
    assert (tmp_path / "hf" / "config.json").is_file()
    assert checkpoint.complete_steps(str(directory)) == list(range(1, steps + 1))
