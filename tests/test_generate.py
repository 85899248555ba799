"""`python -m jaxlm.generate` end to end on a tiny checkpoint trained here."""

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import generate, trainer
from jaxlm.config import base_config
from jaxlm.inference.loading import load_model
from jaxlm.models import Transformer
from tests.greedy_reference import make_greedy_sampler

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    c = base_config()
    c.model.num_layers, c.model.d_model, c.model.d_ff = 1, 32, 64
    c.model.num_heads, c.model.num_kv_heads = 2, 1
    c.data.seq_len, c.data.vocab_size, c.data.max_documents = 16, 400, 60
    c.data.cache_dir = str(tmp / "cache")
    c.train.global_batch_size, c.train.steps, c.train.eval_every = 8, 2, 0
    c.optim.warmup_steps = 1
    c.log.sample_every, c.log.tensorboard, c.log.every_steps = 0, False, 1
    c.checkpoint.every_steps = 2
    trainer.run(c, str(tmp / "run"))
    return tmp / "run"


def test_cli_prints_the_greedy_continuation(run_dir):
    loaded = load_model(str(run_dir))
    prompt = [loaded.tokenizer.bos_id] + loaded.tokenizer.encode("def ")
    expected = make_greedy_sampler(Transformer(loaded.model_cfg), len(prompt) + 6)(
        loaded.params, prompt)
    cmd = [sys.executable, "-m", "jaxlm.generate", f"--workdir={run_dir}", "--prompt=def ",
           "--max_new_tokens=6", "--json"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    eos = loaded.tokenizer.eos_id
    cut = expected.index(eos) + 1 if eos in expected else len(expected)
    assert row["token_ids"] == expected[:cut]
    assert row["completion"] == loaded.tokenizer.decode([t for t in expected[:cut] if t != eos])


def test_score_prints_per_token_logprobs_and_perplexity(run_dir, tmp_path):
    texts = ["def f(x):", "    return x + 1"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = io.StringIO()
    generate.run(generate.Options(workdir=str(run_dir), score=True,
                                  input=str(tmp_path / "in.txt")), stdout=out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    loaded = load_model(str(run_dir))
    tok = loaded.tokenizer
    for text, row in zip(texts, rows):
        ids = [tok.bos_id] + tok.encode(text)
        logits = Transformer(loaded.model_cfg).apply({"params": loaded.params},
                                                     jnp.asarray([ids]))
        logp = np.asarray(jax.nn.log_softmax(logits[0, :-1]))[np.arange(len(ids) - 1), ids[1:]]
        assert row["token_ids"] == ids[1:] and row["num_tokens"] == len(ids) - 1
        np.testing.assert_allclose(row["logprobs"], logp, atol=1e-4)
        assert math.isclose(row["perplexity"], math.exp(-logp.mean()), rel_tol=1e-4)


def test_chat_renders_the_template_and_answers_each_turn(run_dir):
    chat = pytest.importorskip("jaxlm.data.chat")
    seen = []
    render = chat.render_messages

    def spy(messages, *, add_generation_prompt=False):
        seen.append([dict(m) for m in messages])
        return render(messages, add_generation_prompt=add_generation_prompt)

    out = io.StringIO()
    chat.render_messages = spy
    try:
        generate.run(generate.Options(workdir=str(run_dir), chat=True, max_new_tokens=4,
                                      system="be brief"),
                     stdin=io.StringIO("hello\nand again\n\n"), stdout=out)
    finally:
        chat.render_messages = render
    replies = [line for line in out.getvalue().splitlines() if line.startswith("assistant:")]
    assert len(replies) == 2
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]


def test_conflicting_modes_are_refused(run_dir):
    with pytest.raises(ValueError, match="exactly one"):
        generate.run(generate.Options(workdir=str(run_dir), prompts=("a",), score=True))
