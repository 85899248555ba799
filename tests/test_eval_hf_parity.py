"""The jaxlm harness backend equals lm-eval's own Hugging Face backend on an imported model:
per-request log-likelihoods within 1e-4, identical accuracies and generations.

A tiny random Llama and a byte-level BPE tokenizer are built here and saved with
save_pretrained; nothing is downloaded.
"""

import os

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jaxlm.evaluation import harness  # noqa: E402
from jaxlm.evaluation.engine import Engine  # noqa: E402
from jaxlm.evaluation.target import load_target  # noqa: E402
from jaxlm.parallel import sharding  # noqa: E402
from jaxlm.weights.hf import convert as hf  # noqa: E402
from tests.harness_tasks import write_jsonl, write_task  # noqa: E402

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nimport sys\n",
         "class Point:\n    x = 0\n    y = 0\n", "for i in range(10):\n    print(i)\n"] * 5

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                      HF_DATASETS_CACHE=str(tmp / "hf_cache"))
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>",
                                               eos_token="</s>")
    hf_dir = tmp / "hf"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    hf.import_hf(str(hf_dir), str(tmp / "jx"))

    rows = [{"question": "import", "choices": ["os", "sys", "re"], "answer": 0},
            {"question": "def add(a, b):\n   ", "choices": ["return a + b", "pass"],
             "answer": 0},
            {"question": "class", "choices": ["Point:", "Foo(object):", "x"], "answer": 1}]
    docs = [{"text": t * 6} for t in TEXTS[:3]]  # longer than the 64-token context
    gen = [{"prompt": "def add(a", "target": ", b):"}, {"prompt": "import ", "target": "os"}]
    tasks = tmp / "tasks"
    tasks.mkdir()
    write_task(tasks / "choice.yaml", "parity_choice", write_jsonl(tmp / "choice.jsonl", rows),
               "multiple_choice", ["acc", "acc_norm"], text="{{question}}",
               choice="{{choices}}", target="{{answer}}")
    write_task(tasks / "rolling.yaml", "parity_rolling", write_jsonl(tmp / "docs.jsonl", docs),
               "loglikelihood_rolling", ["word_perplexity", "bits_per_byte"], text="",
               target="{{text}}")
    write_task(tasks / "gen.yaml", "parity_gen", write_jsonl(tmp / "gen.jsonl", gen),
               "generate_until", ["exact_match"], text="{{prompt}}", target="{{target}}",
               extra='generation_kwargs:\n  until: ["\\n", "b"]\n  max_gen_toks: 8\n'
                     '  do_sample: false')
    return tmp


def _flat(x):
    if isinstance(x, list | tuple):
        return [y for item in x for y in _flat(item)]
    return [x]


def _responses(out):
    return {task: [(s["doc_id"], s["resps"]) for s in samples]
            for task, samples in out["samples"].items()}


def test_jaxlm_backend_equals_the_hf_backend(setup):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = ["parity_choice", "parity_rolling", "parity_gen"]
    manager = TaskManager(include_path=str(setup / "tasks"), include_defaults=False)
    reference = simple_evaluate(
        model=HFLM(pretrained=str(setup / "hf"), device="cpu", batch_size=4, dtype="float32"),
        tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "pipeline": 1})
    target = load_target(str(setup / "jx"), mesh=mesh)
    assert target.tokenizer.is_hf  # the import has no sentencepiece file: HF tokenizer used
    engine = Engine(target.model_cfg, target.params, target.tokenizer, mesh, batch_size=8)
    ours = harness.evaluate(engine, tasks, include_path=str(setup / "tasks"), log_samples=True)

    compared = {"float": 0, "str": 0}
    for task in tasks:
        want, got = _responses(reference)[task], _responses(ours)[task]
        assert [d for d, _ in want] == [d for d, _ in got]
        for (_, w), (_, g) in zip(want, got):
            for a, b in zip(_flat(w), _flat(g), strict=True):
                if isinstance(a, str):
                    assert a == b, task
                    compared["str"] += 1
                elif isinstance(a, bool):
                    assert a == b, task
                else:
                    np.testing.assert_allclose(float(b), float(a), atol=1e-4, rtol=0)
                    compared["float"] += 1
    assert compared["float"] >= 11 and compared["str"] == 2  # 8 choices + 3 documents; 2 texts
    for task, metric in (("parity_choice", "acc,none"), ("parity_choice", "acc_norm,none"),
                         ("parity_gen", "exact_match,none")):
        assert ours["results"][task][metric] == reference["results"][task][metric]
    np.testing.assert_allclose(ours["results"]["parity_rolling"]["bits_per_byte,none"],
                               reference["results"]["parity_rolling"]["bits_per_byte,none"],
                               rtol=1e-5)
