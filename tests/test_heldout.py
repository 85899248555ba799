"""One held-out split for every measure: on a small stdlib run the in-training eval sample spans
the held-out split, `corpus_bpb` reads the same documents in the same fixed order, and over the
whole split the two give the same loss."""

import functools
import logging
import math
import re

import jax
import pytest

from jaxlm.data import corpus
from jaxlm.data.eval_sample import make_eval_sample
from jaxlm.data.sources import TextRecordSource
from jaxlm.evaluation import builtin
from jaxlm.evaluation.engine import Engine
from jaxlm.evaluation.target import load_target
from jaxlm.models import Transformer
from jaxlm.parallel import sharding
from jaxlm.run import trainer
from jaxlm.stages import pretrain
from tests.run_fixtures import tiny_run_config

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

STEPS = 30


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heldout")
    c = tiny_run_config(tmp, steps=STEPS)
    # 40 held-out documents from the first held-out files; the eval budget a fraction of them.
    c.data.max_documents, c.data.eval_fraction = 400, 0.1
    c.eval.tokens = 4 * 8 * 32  # 4 batches of 8 x 32 tokens
    c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 5
    messages: list[str] = []
    handler = _Collect(messages)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.addHandler(handler)
    absl_logger.setLevel(logging.INFO)
    try:
        trainer.run(c, str(tmp / "run"))
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(level)
    built = corpus.build_stdlib_corpus(c.data.cache_dir, eval_fraction=0.1, max_documents=400)
    return {"config": c, "dir": tmp / "run", "log": "\n".join(messages), "corpus": built}


class _Collect(logging.Handler):
    """Keeps the messages of the run's log records."""

    def __init__(self, messages: list[str]):
        super().__init__(logging.INFO)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_eval_sample_spans_the_heldout_split(run):
    files = run["corpus"].files["eval"]  # [file, documents] in the split's file order
    split_docs = sum(n for _, n in files)
    m = re.search(r"eval sample: (\d+) documents from (\d+) files, ([\d,]+) tokens", run["log"])
    assert m, run["log"][-2000:]
    documents, sampled_files = int(m[1]), int(m[2])
    assert documents < split_docs  # a sample, not the whole split ...
    # ... drawn across it: reading the split in file order, the same number of documents
    # would come from the first few files only.
    prefix_files = next(k for k in range(1, len(files) + 1)
                        if sum(n for _, n in files[:k]) >= documents)
    assert sampled_files > prefix_files and sampled_files >= len(files) // 2


def test_corpus_bpb_reads_the_split_in_the_eval_order(run):
    heldout = builtin.HeldOut.of_run(run["config"].data, run["config"].data.cache_dir)
    docs = heldout.documents()
    records = TextRecordSource([run["corpus"].path("eval")])
    in_file_order = [records[i] for i in range(len(records))]
    assert sorted(docs) == sorted(in_file_order) and list(docs) != in_file_order
    file_of = run["corpus"].file_of("eval")
    first_quarter = {file_of(in_file_order.index(d)) for d in docs[:len(docs) // 4]}
    assert len(first_quarter) >= len(run["corpus"].files["eval"]) // 2


def test_in_training_eval_of_the_whole_split_equals_corpus_bpb(run):
    """The pretrain eval step over the whole split (packed rows, as in training) and corpus_bpb
    (rolling windows of the context) measure one loss, to within their different contexts."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1},
                              devices=jax.devices()[:1])
    target = load_target(str(run["dir"]), mesh=mesh)
    data = run["config"].data
    sample = make_eval_sample(data, target.tokenizer.raw, tokens=10**6, batch_size=8,
                              cache_dir=data.cache_dir)
    assert sample.whole_split and sample.documents == sum(n for _, n in run["corpus"].files[
        "eval"])
    step = jax.jit(functools.partial(pretrain.eval_step, model=Transformer(target.model_cfg)))
    sums = [jax.device_get(step(target.params, b)) for b in sample.batches]
    eval_loss = sum(float(x["nll_sum"]) for x in sums) / sum(float(x["num_tokens"])
                                                             for x in sums)
    engine = Engine(target.model_cfg, target.params, target.tokenizer, mesh, batch_size=8)
    heldout = builtin.HeldOut.of_run(data, data.cache_dir)
    bpb = builtin.corpus_bpb(engine, 10**6, heldout=heldout)
    assert bpb["documents"] == sample.documents
    assert math.log(400) - eval_loss > 0.5  # the model learned something to compare
    assert abs(eval_loss - math.log(bpb["token_perplexity"])) < 0.1, (eval_loss, bpb)
