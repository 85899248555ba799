"""`python -m jaxlm.tools.generate` end to end on a tiny checkpoint trained here."""

import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import Transformer
from jaxlm.run import trainer
from jaxlm.tools import generate
from jaxlm.weights.restore import restore
from tests.cli import run_cli
from tests.greedy_reference import make_greedy_sampler
from tests.run_fixtures import tiny_run_config

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    trainer.run(tiny_run_config(tmp, num_layers=1, seq_len=16), str(tmp / "run"))
    return tmp / "run"


def test_cli_prints_the_greedy_continuation(run_dir):
    loaded = restore(str(run_dir))
    prompt = [loaded.tokenizer.bos_id] + loaded.tokenizer.encode("def ")
    expected = make_greedy_sampler(Transformer(loaded.model_cfg), len(prompt) + 6)(
        loaded.params, prompt)
    proc = run_cli("jaxlm.tools.generate", f"--workdir={run_dir}", "--prompt=def ",
                   "--max_new_tokens=6", "--json", timeout=300)
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
    loaded = restore(str(run_dir))
    tok = loaded.tokenizer
    for text, row in zip(texts, rows):
        ids = [tok.bos_id] + tok.encode(text)
        logits = jax.jit(Transformer(loaded.model_cfg).apply)(
            {"params": loaded.params}, jnp.asarray([ids]))
        logp = np.asarray(jax.nn.log_softmax(logits[0, :-1]))[np.arange(len(ids) - 1), ids[1:]]
        assert row["token_ids"] == ids[1:] and row["num_tokens"] == len(ids) - 1
        np.testing.assert_allclose(row["logprobs"], logp, atol=1e-4)
        assert math.isclose(row["perplexity"], math.exp(-logp.mean()), rel_tol=1e-4)


def test_score_reads_json_lines_of_multi_line_texts(run_dir, tmp_path):
    texts = ["def f(x):\n    return x + 1\n", "import os\n\nprint(os.sep)"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n\n"
                                               for i, t in enumerate(texts)))
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    assert generate.read_score_input(str(tmp_path / "in.jsonl")) == texts
    assert generate.read_score_input(str(tmp_path / "in.txt")) == [  # plain: one per line
        line for t in texts for line in t.split("\n") if line.strip()]
    out = io.StringIO()
    generate.run(generate.Options(workdir=str(run_dir), score=True,
                                  input=str(tmp_path / "in.jsonl")), stdout=out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    tok = restore(str(run_dir)).tokenizer
    assert [r["text"] for r in rows] == texts
    assert [r["token_ids"] for r in rows] == [tok.encode(t) for t in texts]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nplain text\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not a JSON object"):
        generate.read_score_input(str(tmp_path / "bad.jsonl"))


def _chat(run_dir, monkeypatch, stdin, chat_overrides=None, **options):
    """Runs --chat; returns (printed replies, the loaded run, prompts sent as token ids)."""
    from jaxlm.inference import sampler
    from jaxlm.weights import restore as restore_lib

    loaded = restore(str(run_dir))
    for key, value in (chat_overrides or {}).items():
        loaded.config.chat[key] = value
    monkeypatch.setattr(restore_lib, "restore", lambda *args, **kwargs: loaded)
    sent = []
    original = sampler.Sampler.generate

    def spy(self, requests, *args, **kwargs):
        sent.extend(list(r.prompt) for r in requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(sampler.Sampler, "generate", spy)
    out = io.StringIO()
    generate.run(generate.Options(workdir=str(run_dir), chat=True, max_new_tokens=4, **options),
                 stdin=io.StringIO(stdin), stdout=out)
    replies = [line for line in out.getvalue().splitlines() if line.startswith("assistant:")]
    return replies, loaded, sent


def test_chat_answers_each_turn_with_the_whole_conversation(run_dir, monkeypatch):
    from jaxlm.data import chat

    replies, loaded, sent = _chat(run_dir, monkeypatch, "hello\nand again\n\n",
                                  system="be brief")
    assert len(replies) == 2 and len(sent) == 2
    template = chat.template_from_config(loaded.config.chat)
    answer = replies[0][len("assistant: "):]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": answer}, {"role": "user", "content": "and again"}]
    assert sent[1] == chat.prompt_ids(loaded.tokenizer, messages, template=template).tolist()


def test_chat_prompt_ids_are_the_ids_sft_trained_on(run_dir, monkeypatch):
    """With the run's own chat.* settings (not the defaults), the ids of the rendered
    conversation equal `chat.prompt_ids` under that template: what SFT's data trains on."""
    from jaxlm.data import chat

    overrides = {"role_separator": ": ", "turn_separator": "\\n\\n",
                 "system_prompt": "You answer in Python.", "add_bos": False}
    _, loaded, sent = _chat(run_dir, monkeypatch, "print a list\n\n", overrides)
    template = chat.template_from_config(loaded.config.chat)
    messages = [{"role": "user", "content": "print a list"}]
    expected = chat.prompt_ids(loaded.tokenizer, messages, template=template).tolist()
    assert sent == [expected]
    assert expected[0] != loaded.tokenizer.bos_id  # chat.add_bos, not data.add_bos
    # Encoding the rendered text at once (with data.add_bos) gives other ids.
    text = chat.render_messages(messages, add_generation_prompt=True, template=template)
    assert sent[0] != [loaded.tokenizer.bos_id] + loaded.tokenizer.encode(text)


def test_conflicting_modes_are_refused(run_dir):
    with pytest.raises(ValueError, match="exactly one"):
        generate.run(generate.Options(workdir=str(run_dir), prompts=("a",), score=True))


def test_beam_flags_reach_the_beam_search(run_dir):
    """--num_beams / --length_penalty / --early_stopping print the best hypothesis of
    `Sampler.beam_search` under the same settings (defaults: transformers')."""
    from jaxlm.inference import Request, Sampler

    loaded = restore(str(run_dir))
    tok = loaded.tokenizer
    sampler = Sampler(loaded.model_cfg, loaded.params, pad_id=tok.pad_id)
    prompt = [tok.bos_id] + tok.encode("def ")
    for penalty, stopping in ((1.0, "false"), (-2.0, "never")):
        out = io.StringIO()
        generate.run(generate.Options(workdir=str(run_dir), prompts=("def ",), num_beams=3,
                                      max_new_tokens=6, length_penalty=penalty,
                                      early_stopping=stopping, json=True), stdout=out)
        row = json.loads(out.getvalue().strip().splitlines()[-1])
        best = sampler.beam_search([Request(prompt, 6, (tok.eos_id,))], 3, penalty,
                                   generate.EARLY_STOPPING[stopping])[0][0]
        assert row["token_ids"] == best.tokens
    assert generate.Options(workdir="").length_penalty == 1.0
    with pytest.raises(ValueError, match="--early_stopping='sometimes'"):
        generate.run(generate.Options(workdir=str(run_dir), prompts=("def ",), num_beams=2,
                                      early_stopping="sometimes"))
