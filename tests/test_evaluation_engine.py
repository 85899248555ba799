"""jaxlm.evaluation: the engine's log-likelihoods, rolling windows, batching and greedy
generation against the scoring API and the sampler; built-in evals; the CLI end to end."""

import functools
import io
import json
import math

import jax
import numpy as np
import pytest

from jaxlm.evaluation import builtin, results
from jaxlm.evaluation.engine import Engine, bits_per_byte, cut_at_stop, rolling_windows
from jaxlm.evaluation.target import load_target
from jaxlm.inference import scoring
from jaxlm.inference.sampler import Request, Sampler
from jaxlm.models import Transformer
from jaxlm.parallel import sharding
from jaxlm.run import trainer
from jaxlm.run.errors import ConfigError
from jaxlm.tools import eval as eval_cli
from tests.cli import cli_env, run_cli
from tests.harness_tasks import write_jsonl, write_task
from tests.run_fixtures import tiny_run_config

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    trainer.run(tiny_run_config(tmp), str(tmp / "run"))
    return tmp / "run"


@pytest.fixture(scope="module")
def target(run_dir):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1},
                              devices=jax.devices()[:1])
    return load_target(str(run_dir), mesh=mesh)


def _heldout(target):
    """The run's held-out split (from its cache), as the eval CLI reads it."""
    return builtin.HeldOut.of_run(target.config.data, target.config.data.cache_dir)


def _engine(target, **kwargs):
    return Engine(target.model_cfg, target.params, target.tokenizer, target.mesh, **kwargs)


@functools.cache
def _ref_apply(cfg):
    return jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x)[0])


def _ref_logits(target, ids, length=64):
    """Full-forward logits of `ids` (right-padded to one length: causal, so the padding
    changes nothing before it; one compiled program)."""
    padded = np.zeros((1, length), np.int32)
    padded[0, :len(ids)] = ids
    return np.asarray(_ref_apply(target.model_cfg)(target.params, padded))[:len(ids)]


def _requests(target):
    tok = target.tokenizer
    texts = [("def f(x):\n    return", " x + 1\n"), ("import", " os"),
             ("class A:\n    def __init__(self):\n        self.x = 0\n", "        pass"),
             ("", "print(1)"), ("for i in range(10):", "\n        yield i")]
    return [(tok.encode(c) if c else [tok.prefix_id], tok.encode(x, special=False))
            for c, x in texts]


@pytest.mark.slow
def test_loglikelihood_is_the_sum_of_scored_token_logprobs(target):
    engine = _engine(target, batch_size=4)
    pairs = _requests(target)
    scorer = Sampler(target.model_cfg, target.params, pad_id=target.tokenizer.pad_id)
    assert any(len(c + x) > engine.max_length + 1 for c, x in pairs)  # some are cut on the left
    for (ctx, cont), (got, greedy) in zip(pairs, engine.loglikelihood(pairs)):
        whole = (ctx + cont)[-(engine.max_length + 1):]  # the harness's truncation
        logp = scorer.score([whole])[0]
        np.testing.assert_allclose(got, float(np.sum(logp[-len(cont):])), rtol=1e-5, atol=1e-5)
        argmax = _ref_logits(target, whole)[-len(cont) - 1:-1].argmax(-1)
        assert greedy == bool(np.all(argmax == np.asarray(cont)))


def test_is_greedy_true_for_the_models_own_continuation(target):
    engine = _engine(target, batch_size=2)
    ctx = target.tokenizer.encode("def main():\n")
    cont = []
    for _ in range(3):  # the greedy continuation, token by token, from the full forward pass
        cont.append(int(_ref_logits(target, ctx + cont)[-1].argmax()))
    other = [(cont[0] + 1) % target.tokenizer.vocab_size] + cont[1:]
    (lp_g, is_g), (lp_o, is_o) = engine.loglikelihood([(ctx, cont), (ctx, other)])
    assert is_g and not is_o and lp_g > lp_o


@pytest.mark.slow
def test_batching_and_padding_change_no_number(target):
    pairs = _requests(target) * 3
    batched = _engine(target, batch_size=8).loglikelihood(pairs)
    single = [_engine(target, batch_size=1).loglikelihood([p])[0] for p in pairs[:5]]
    np.testing.assert_allclose([s for s, _ in batched[:5]], [s for s, _ in single], rtol=1e-6,
                               atol=1e-6)
    assert [g for _, g in batched[:5]] == [g for _, g in single]
    # The copies sit at other rows and offsets of the batch; XLA:CPU's vectorized kernels may
    # round one token's log-prob differently there (one float32 ulp seen on AVX-512 hosts).
    for copy in (batched[5:10], batched[10:]):
        np.testing.assert_allclose([s for s, _ in copy], [s for s, _ in batched[:5]], rtol=1e-6,
                                   atol=1e-6)
        assert [g for _, g in copy] == [g for _, g in batched[:5]]


def test_rolling_loglikelihood_sums_disjoint_windows(target):
    engine = _engine(target, batch_size=4, max_length=16)
    tok = target.tokenizer
    doc = tok.encode("def add(a, b):\n    return a + b\n\n\nclass Point:\n    x = 0\n" * 3,
                     special=False)
    assert len(doc) > 3 * 16
    windows = rolling_windows(doc, tok.prefix_id, 16)
    assert sum((c for _, c in windows), []) == doc  # every token scored once
    assert all(len(c) + len(x) <= 17 for c, x in windows)
    lm_utils = pytest.importorskip("lm_eval.utils")
    harness = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        token_list=doc, prefix_token=tok.prefix_id, max_seq_len=16, context_len=1)]
    assert [(list(a), list(b)) for a, b in harness] == windows
    scorer = Sampler(target.model_cfg, target.params, pad_id=tok.pad_id)
    expected = sum(float(np.sum(scorer.score([c + x])[0][-len(x):])) for c, x in windows)
    np.testing.assert_allclose(engine.loglikelihood_rolling([doc])[0], expected, rtol=1e-5)


def _alone(scorer, ctx, cont, max_length):
    """log p(cont | ctx) of one request scored by itself (Sampler.score, unpacked)."""
    whole = (list(ctx) + list(cont))[-(max_length + 1):]
    return float(np.sum(scorer.score([whole])[0][-min(len(cont), len(whole) - 1):]))


def test_packed_scoring_equals_one_request_at_a_time(target):
    """Mixed lengths (several requests to a row, some cut on the left) and documents longer
    than a row (rolling windows), against each request and window scored alone."""
    rng = np.random.default_rng(0)
    vocab = target.tokenizer.vocab_size
    pairs = [(rng.integers(3, vocab, int(c)).tolist(), rng.integers(3, vocab, int(x)).tolist())
             for c, x in zip(rng.integers(1, 24, 30), rng.integers(1, 8, 30))]
    docs = [rng.integers(3, vocab, n).tolist() for n in (5, 16, 17, 40, 3, 70, 9)]
    engine = _engine(target, batch_size=4, max_length=16)
    lengths = [min(len(c) + len(x), 17) - 1 for c, x in pairs]
    assert any(len(row) > 1 for b in scoring.pack(lengths, num_rows=4, max_len=16)
               for row in b.placed)  # rows really are shared
    scorer = Sampler(target.model_cfg, target.params, pad_id=target.tokenizer.pad_id)
    got = engine.loglikelihood(pairs)
    want = [_alone(scorer, c, x, 16) for c, x in pairs]
    np.testing.assert_allclose([lp for lp, _ in got], want, rtol=1e-5, atol=1e-5)
    rolling = engine.loglikelihood_rolling(docs)
    want = [sum(_alone(scorer, c, x, 16) for c, x in rolling_windows(d, target.tokenizer.prefix_id,
                                                                     16)) for d in docs]
    np.testing.assert_allclose(rolling, want, rtol=1e-5, atol=1e-5)
    # scored tokens: each continuation (all of it fits 16), then every document token
    assert engine.throughput.tokens == sum(len(x) for _, x in pairs) + sum(map(len, docs))


@pytest.mark.slow
def test_generate_until_is_greedy_and_stops_at_every_stop_string(target):
    engine = _engine(target, batch_size=4)
    tok = target.tokenizer
    prompts = [tok.encode(t) for t in ("def ", "import sys\n", "class Foo(", "    return ")]
    sampler = Sampler(target.model_cfg, target.params, pad_id=tok.pad_id)
    full = []
    for p in prompts:
        tokens = sampler.generate([Request(p, 12, (tok.eos_id,))])[0].tokens
        full.append(tok.decode([t for t in tokens if t != tok.eos_id]))
    assert engine.generate_until(prompts, [[]] * 4, [12] * 4) == full
    for text, p in zip(full, prompts):
        if len(text) < 4:
            continue
        for stop in {text[2:4], text[-2:], text[1]}:  # stop strings the output really contains
            got = engine.generate_until([p], [[stop, "@@never@@"]], [12])[0]
            assert got == text[:text.find(stop)] and stop not in got


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("abc\n\ndef", ["d", "\n\n"]) == "abc"
    assert cut_at_stop("abc", ["x"]) == "abc"


def test_bits_per_byte_hand_checked():
    # loss 2.0 nats/token over 10 tokens of an 8-byte text: 20 / (8 * ln 2) = 3.6067376 bits.
    assert bits_per_byte(2.0 * 10, 8) == pytest.approx(3.6067376, abs=1e-7)


def test_corpus_bpb_matches_token_logprobs(target):
    engine = _engine(target, batch_size=4)
    heldout = _heldout(target)
    got = builtin.corpus_bpb(engine, 2, heldout=heldout)
    docs = heldout.documents()[:2]
    nll = -sum(engine.loglikelihood_rolling([target.tokenizer.encode(d, special=False)])[0]
               for d in docs)
    tokens = sum(len(target.tokenizer.encode(d, special=False)) for d in docs)
    assert got["tokens"] == tokens and got["bytes"] == sum(len(d.encode()) for d in docs)
    loss = nll / tokens
    assert got["bits_per_byte"] == pytest.approx(loss * tokens / (got["bytes"] * math.log(2)),
                                                 rel=1e-5)
    assert got["token_perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_next_line_accuracy_is_argmax_of_choice_loglikelihoods(target):
    engine = _engine(target, batch_size=8)
    heldout = _heldout(target)
    examples = builtin.next_line_examples(6, heldout)
    assert all(len(ex["choices"]) == 4 and len(set(ex["choices"])) == 4 for ex in examples)
    tok = target.tokenizer
    hits = 0
    for ex in examples:
        scores = [engine.loglikelihood([(tok.encode(ex["context"]),
                                         tok.encode(c + "\n", special=False))])[0][0]
                  for c in ex["choices"]]
        hits += int(np.argmax(scores)) == ex["gold"]
    assert builtin.next_line(engine, 6, heldout=heldout)["acc"] == hits / 6


@pytest.mark.slow
def test_cli_builtin_writes_results_with_config_and_step(run_dir, tmp_path):
    out = io.StringIO()
    opts = eval_cli.Options(workdir=str(run_dir), tasks="builtin", limit=4, batch_size=8,
                            output=str(tmp_path / "r.json"), progress=False)
    got = eval_cli.run(opts, stdout=out)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["results"]) == set(builtin.TASKS)
    assert saved["checkpoint"]["step"] == 2 and saved["config"]["model"]["d_model"] == 32
    assert saved["throughput"]["requests"] == got["throughput"]["requests"] > 0
    table = out.getvalue()
    assert "bits_per_byte" in table and "requests/s" in table
    flat = results.flat_metrics(saved)
    assert flat["eval/next_line/acc"] == saved["results"]["next_line"]["acc"]


def test_progress_bar_shows_rate_and_eta():
    stream = io.StringIO()
    bar = results.ProgressBar(10, stream, every_s=0.0)
    bar.label = "next_line"
    bar(4)
    bar.add_total(10)
    bar(6)
    line = stream.getvalue().split("\r")[-1]
    assert "next_line" in line and "10/20 requests" in line and "eta" in line


def test_split_tasks_expands_builtin():
    assert results.split_tasks("builtin,hellaswag") == (list(builtin.TASKS), ["hellaswag"])
    assert results.metric_name("acc,none") == "acc"
    assert results.metric_name("exact_match,strict-match") == "exact_match_strict-match"


def test_a_task_no_task_file_names_is_refused_without_the_harness_index(tmp_path):
    """The quick refusal only ever refuses names that appear in no task YAML: the harness's
    own tasks, groups and tags, and local tasks, pass it (and go on to the full index)."""
    harness = pytest.importorskip("jaxlm.evaluation.harness")
    (tmp_path / "mine.yaml").write_text("task: jaxlm_mine\ndataset_path: json\n")
    assert harness._named_in_no_task_file(
        ["hellaswag", "arc_easy", "mmlu", "jaxlm_mine"], str(tmp_path)) == []
    assert harness._named_in_no_task_file(["hellaswag", "hellaswg"], "") == ["hellaswg"]
    with pytest.raises(ConfigError, match=r"'hellaswg' is neither .* did you mean hellaswag"):
        harness.check_tasks(["arc_easy", "hellaswg"])
    with pytest.raises(ConfigError, match=r"'jaxlm_mne' .* did you mean jaxlm_mine"):
        harness.check_tasks(["jaxlm_mne"], str(tmp_path))
    assert harness._task_manager.cache_info().currsize == 0  # no index was built


@pytest.mark.slow
def test_local_harness_task_runs_through_the_cli(run_dir, target, tmp_path):
    pytest.importorskip("lm_eval")
    rows = [{"question": "import", "choices": ["os", "sys", "re"], "answer": 0},
            {"question": "def f(x):\n    return", "choices": ["x", "1 +"], "answer": 1},
            {"question": "class", "choices": ["A:", "B(object):"], "answer": 0}]
    gen = [{"prompt": "def ", "target": "x"}, {"prompt": "import ", "target": "os"}]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks / "choice.yaml", "jaxlm_local_choice",
               write_jsonl(tmp_path / "choice.jsonl", rows), "multiple_choice", ["acc"],
               text="{{question}}", choice="{{choices}}", target="{{answer}}")
    write_task(tasks / "gen.yaml", "jaxlm_local_gen", write_jsonl(tmp_path / "gen.jsonl", gen),
               "generate_until", ["exact_match"], text="{{prompt}}", target="{{target}}",
               extra='generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6')
    env = cli_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                  HF_DATASETS_CACHE=str(tmp_path / "hf_cache"), HF_HOME=str(tmp_path / "hf"))
    proc = run_cli("jaxlm.tools.eval", f"--workdir={run_dir}",
                   "--tasks=jaxlm_local_choice,jaxlm_local_gen", f"--include_path={tasks}",
                   f"--output={tmp_path / 'out.json'}", "--batch_size=4", "--noprogress",
                   env=env, timeout=300)
    assert "jaxlm_local_choice" in proc.stdout
    saved = json.loads((tmp_path / "out.json").read_text())["results"]
    engine = _engine(target, batch_size=4)
    tok = target.tokenizer
    hits = 0
    for r in rows:  # the harness's causal split of question + " " + choice: the space moves
        scores = []  # to the continuation, which is encode(whole) minus encode(context)
        for c in r["choices"]:
            whole, ctx = tok.encode(r["question"] + " " + c), tok.encode(r["question"])
            scores.append(engine.loglikelihood([(ctx, whole[len(ctx):])])[0][0])
        hits += int(np.argmax(scores)) == r["answer"]
    assert saved["jaxlm_local_choice"]["acc,none"] == pytest.approx(hits / len(rows))
    texts = engine.generate_until([tok.encode(g["prompt"]) for g in gen],
                                  [["\n", tok.decode([tok.eos_id])]] * 2, [6, 6])
    want = sum(t.strip() == g["target"] for t, g in zip(texts, gen)) / len(gen)
    assert saved["jaxlm_local_gen"]["exact_match,none"] == pytest.approx(want)
