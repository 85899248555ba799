"""The README quickstart's defaults against the alternatives they were chosen over, judged on
held-out data that represents what the model is for.

    python benchmarks/first_run.py --work_dir=/tmp/first_run [--variants=defaults,seq256_v4096]
    python benchmarks/first_run.py --work_dir=/tmp/first_run --variants= --timed=defaults

Each variant is `python -m jaxlm.main --config=configs/tiny.py` with a few overrides, all from
the same seed and on the same number of training tokens (`TOKENS`, so the comparison does not
depend on how busy the machine is), sharing one corpus and tokenizer cache (built before the
variants, untimed; tokenizers are keyed by their settings). Reported per variant, after training:

    eval loss    the last in-training evaluation (the representative held-out sample)
    train loss   the mean logged training loss over the last 10% of steps (fresh batches:
                 a run reads less than one epoch)
    stdlib       `corpus_bpb` over the whole held-out split (the run's deduplicated stdlib
                 files never trained on): bits per byte and nats per token
    train split  nats per token of `_TRAIN_SAMPLE` training-split documents (a fixed-seed
                 sample, scored like `corpus_bpb`; the run read about a third of them):
                 how hard the training distribution is, beside the held-out split
    third-party  bits per byte of pure-Python code from outside the standard library, two
                 groups of `THIRD_PARTY` installed beside jaxlm (tests left out): "general"
                 (pip, setuptools, absl, ml_collections: the kind of Python the stdlib is)
                 and "jax" (etils, chex, optax, flax: array code, further from the corpus).
                 Each group's files are cut into documents like the corpus (each kept to its
                 first `_MAX_DOC_CHARS` characters) and drawn in a fixed order up to
                 `--third_party_chars` characters; scored like
                 `corpus_bpb`. Printed first: how many of these documents match a training
                 document at MinHash Jaccard >= `_CONTAMINATION_THRESHOLD` (none should)
    sample       the last logged greedy sample

and the CPU seconds of the training command (user + system, steadier than wall time on a shared
machine), its wall time and `/proc/pressure/cpu` "some avg10" before/after.

`--rescore` scores the variants' existing run directories again without training them (the
training figures are read from each directory's `first_run.json`).

`--timed=NAME` then runs variant NAME as a first run from nothing (its own empty cache: corpus,
tokenizer, training, evaluations) and reports its wall and CPU time: the quickstart's cost.
Prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Training tokens of every compared variant: 600 steps of 16 x 128.
TOKENS = 600 * 16 * 128
# name -> settings of configs/tiny.py that every variant states (the step count follows from
# TOKENS); "defaults" is configs/tiny.py as it is.
VARIANTS = {
    "defaults": {},
    "seq128_v8192": {"data.seq_len": 128, "train.global_batch_size": 16,
                          "data.vocab_size": 8192, "optim.learning_rate": 3e-3},
    "seq256_v8192": {"data.seq_len": 256, "train.global_batch_size": 8,
                          "data.vocab_size": 8192, "optim.learning_rate": 3e-3},
    "seq128_v4096": {"data.seq_len": 128, "train.global_batch_size": 16,
                          "data.vocab_size": 4096, "optim.learning_rate": 3e-3},
    "seq256_v4096": {"data.seq_len": 256, "train.global_batch_size": 8,
                          "data.vocab_size": 4096, "optim.learning_rate": 3e-3},
    "seq256_v4096_lr5e-3": {"data.seq_len": 256, "train.global_batch_size": 8,
                                 "data.vocab_size": 4096, "optim.learning_rate": 5e-3},
    "seq128_v8192_lr5e-3": {"data.seq_len": 128, "train.global_batch_size": 16,
                            "data.vocab_size": 8192, "optim.learning_rate": 5e-3},
    "seq128_v8192_l6_d192": {"data.seq_len": 128, "train.global_batch_size": 16,
                             "data.vocab_size": 8192, "optim.learning_rate": 3e-3,
                             "model.num_layers": 6, "model.d_model": 192, "model.num_heads": 3,
                             "model.num_kv_heads": 1, "model.d_ff": 576},
    "seq128_v8192_batch32": {"data.seq_len": 128, "train.global_batch_size": 32,
                                  "data.vocab_size": 8192, "optim.learning_rate": 3e-3},
}
# Pure-Python packages installed beside jaxlm (pip and setuptools, jaxlm's dependencies), read
# from site-packages. Folders that copy standard-library code are left out: setuptools'
# `_distutils` (the stdlib's distutils) and every `_vendor` (pip's holds tomli, the stdlib's
# tomllib). `third_party_contamination` checks what is left against the training documents.
THIRD_PARTY = {"general": ("pip", "setuptools", "absl", "ml_collections"),
               "jax": ("etils", "chex", "optax", "flax")}
_SKIPPED_DIRS = ("_vendor", "_distutils", "__pycache__")
_THIRD_PARTY_SEED = 0
# Training-split documents scored for the "train split" column.
_TRAIN_SAMPLE = 200
# Characters kept of each third-party document (its beginning), so that one long class or
# generated file cannot fill a group's sample.
_MAX_DOC_CHARS = 4000
# Jaccard similarity (5-word shingles) at which a third-party document counts as seen in
# training: lower than the corpus dedup's 0.8, so partial copies count too.
_CONTAMINATION_THRESHOLD = 0.5

_WORK_DIR = flags.DEFINE_string("work_dir", None, "Run directories and the shared cache.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Which of " + ", ".join(VARIANTS))
_TIMED = flags.DEFINE_string("timed", "", "Also time this variant as a first run from "
                             "nothing (its own empty cache).")
_TOKENS = flags.DEFINE_integer("tokens", TOKENS, "Training tokens of every variant.")
_THIRD_PARTY_CHARS = flags.DEFINE_integer("third_party_chars", 100_000,
                                          "Characters of third-party code scored per group.")
_RESCORE = flags.DEFINE_bool("rescore", False, "Score the variants' run directories again "
                             "instead of training them.")


def cpu_pressure() -> str:
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[1].removeprefix("avg10=")
    except OSError:
        return "n/a"


def tiny_defaults() -> dict:
    """configs/tiny.py's values of the settings the variants state."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs/tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    return {"data.seq_len": c.data.seq_len, "train.global_batch_size": c.train.global_batch_size,
            "data.vocab_size": c.data.vocab_size, "optim.learning_rate": c.optim.learning_rate}


def describe(name: str) -> str:
    s = {**tiny_defaults(), **VARIANTS[name]}
    extra = "".join(f", {k.split('.')[-1]} {v}" for k, v in s.items() if k.startswith("model."))
    return (f"seq {s['data.seq_len']}, batch {s['train.global_batch_size']}, vocab "
            f"{s['data.vocab_size']}, lr {s['optim.learning_rate']:g}{extra}")


def third_party_documents(packages: tuple[str, ...], max_chars: int) -> list[str]:
    """Documents of the packages' .py files (no tests), each cut to _MAX_DOC_CHARS, in a fixed
    random order, up to max_chars characters (the last one cut)."""
    import sysconfig

    from jaxlm.data import corpus

    root = sysconfig.get_paths()["purelib"]
    docs = []
    for package in packages:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
            dirnames[:] = sorted(d for d in dirnames
                                 if "test" not in d and d not in _SKIPPED_DIRS)
            for name in sorted(filenames):
                if (name.endswith(".py") and not name.startswith("test")
                        and not name.endswith("_test.py")):
                    with open(os.path.join(dirpath, name), "rb") as f:
                        text = f.read().decode("utf-8", errors="replace")
                    docs += [d[:_MAX_DOC_CHARS] for d in corpus.split_documents(text)]
    random.Random(_THIRD_PARTY_SEED).shuffle(docs)
    out, used = [], 0
    for doc in docs:
        if used >= max_chars:
            break
        out.append(doc[:max_chars - used])
        used += len(out[-1])
    return out


def third_party_contamination(documents: list[str], cache_dir: str):
    """`dedup.Contamination` of `documents` against the training split of configs/tiny.py's
    corpus (built in `cache_dir`)."""
    from jaxlm.data import corpus, dedup
    from jaxlm.data.sources import TextRecordSource

    built = corpus.build_stdlib_corpus(cache_dir)
    fingerprint = dedup.Fingerprinter()

    def signatures(texts, name):
        out = []
        for k, text in enumerate(texts):
            fp = fingerprint(text)
            if fp is not None:
                out.append((fp.signature_P, f"{name}#{k}"))
        return out

    train = TextRecordSource([built.path("train")])
    return dedup.find_contamination(
        signatures(documents, "third-party"),
        signatures((train[i] for i in range(len(train))), "train"), _CONTAMINATION_THRESHOLD)


def package_versions() -> str:
    found = []
    for dist in ("pip", "setuptools", "absl-py", "ml-collections", "etils", "chex", "optax",
                 "flax"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist} (not installed)")
    return ", ".join(found)


def held_out_scores(workdir: str, cache_dir: str, third_party: dict[str, list[str]]) -> dict:
    """corpus_bpb over the run's whole held-out split and bits per byte of each group of
    `third_party`."""
    import jax

    from jaxlm.data import corpus
    from jaxlm.data.sources import TextRecordSource
    from jaxlm.evaluation import builtin
    from jaxlm.evaluation.engine import Engine, bits_per_byte
    from jaxlm.evaluation.target import load_target
    from jaxlm.parallel import sharding

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1},
                              devices=jax.devices()[:1])
    target = load_target(workdir, mesh=mesh)
    engine = Engine(target.model_cfg, target.params, target.tokenizer, mesh, batch_size=16)
    stdlib = builtin.corpus_bpb(engine, 10**6,
                                heldout=builtin.HeldOut.of_run(target.config.data, cache_dir))
    out = {"stdlib_bpb": stdlib["bits_per_byte"],
           "stdlib_nats": math.log(stdlib["token_perplexity"]),
           "stdlib_documents": stdlib["documents"], "stdlib_tokens": stdlib["tokens"]}
    built = corpus.build_stdlib_corpus(cache_dir)
    train = TextRecordSource([built.path("train")])
    docs = [train[i] for i in random.Random(1).sample(range(len(train)), _TRAIN_SAMPLE)]
    tokens = [engine.tokenizer.encode(d, special=False) for d in docs]
    out["train_split_nats"] = -sum(engine.loglikelihood_rolling(tokens)) / sum(map(len, tokens))
    for group, docs in third_party.items():
        tokens = [engine.tokenizer.encode(d, special=False) for d in docs]
        nll = -sum(engine.loglikelihood_rolling(tokens))
        num_bytes = sum(len(d.encode()) for d in docs)
        out[f"{group}_bpb"] = bits_per_byte(nll, num_bytes)
        out[f"{group}_tokens"] = sum(map(len, tokens))
    return out


def train(workdir: str, cache_dir: str, overrides: list[str]) -> dict:
    """Runs the training command; its wall and CPU seconds and the pressure around it."""
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resume of an earlier one
    cmd = [sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py",
           f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}", *overrides]
    before, usage = cpu_pressure(), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    record = {"wall_s": seconds, "cpu_s": cpu, "pressure": f"{before}/{cpu_pressure()}"}
    with open(os.path.join(workdir, "first_run.json"), "w") as f:
        json.dump(record, f)
    return record


def run_variant(name: str, work_dir: str, cache_dir: str, third_party: dict[str, list[str]]
                ) -> dict:
    settings = {**tiny_defaults(), **VARIANTS[name]}
    batch, seq = settings["train.global_batch_size"], settings["data.seq_len"]
    steps = _TOKENS.value // (batch * seq)
    overrides = [f"--config.{k}={v}" for k, v in VARIANTS[name].items()]
    workdir = os.path.join(work_dir, name)
    if _RESCORE.value:
        with open(os.path.join(workdir, "first_run.json")) as f:
            record = json.load(f)
    else:
        record = train(workdir, cache_dir, [f"--config.train.steps={steps}", *overrides])
    out = {"name": name, "steps": steps, "tokens": steps * batch * seq, **record}
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval_loss" in r]
    tail = [r["loss"] for r in rows if "loss" in r and r["step"] > 0.9 * steps]
    with open(os.path.join(workdir, "log.txt")) as f:
        samples = re.findall(r"sample at step \d+: (.*)", f.read())
    out.update(eval_loss=evals[-1]["eval_loss"], train_loss=sum(tail) / len(tail),
               sample=samples[-1] if samples else "",
               **held_out_scores(workdir, cache_dir, third_party))
    return out


def timed_first_run(name: str, work_dir: str) -> dict:
    """Variant `name` from nothing: an empty cache, so the corpus and tokenizer are built."""
    cache_dir = os.path.join(work_dir, f"timed-{name}-cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    overrides = [f"--config.{k}={v}" for k, v in VARIANTS[name].items()]
    return {"name": name, **train(os.path.join(work_dir, f"timed-{name}"), cache_dir,
                                  overrides)}


def main(argv: list[str]) -> None:
    del argv
    chosen = [v for v in _VARIANTS.value if v]
    unknown = sorted(set(chosen + ([_TIMED.value] if _TIMED.value else [])) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    work_dir = os.path.abspath(_WORK_DIR.value)
    cache_dir = os.path.join(work_dir, "cache")
    os.makedirs(work_dir, exist_ok=True)
    third_party = {group: third_party_documents(packages, _THIRD_PARTY_CHARS.value)
                   for group, packages in THIRD_PARTY.items()}
    print(f"third-party code: {package_versions()}; " + ", ".join(
        f"{group} {len(docs)} documents, {sum(map(len, docs)):,} characters"
        for group, docs in third_party.items()), flush=True)
    # Build the corpus and each tokenizer once, untimed: every variant then starts alike.
    for vocab in sorted({{**tiny_defaults(), **VARIANTS[n]}["data.vocab_size"] for n in chosen}
                        if not _RESCORE.value else ()):
        train(os.path.join(work_dir, f"warm-{vocab}"), cache_dir,
              ["--config.train.steps=1", "--config.eval.every_steps=0",
               "--config.log.sample_every=0", f"--config.data.vocab_size={vocab}"])
    if chosen:
        found = third_party_contamination(sum(third_party.values(), []), cache_dir)
        print(f"third-party documents matching a training document at Jaccard >= "
              f"{_CONTAMINATION_THRESHOLD}: {found.documents} of {found.checked} "
              f"{found.examples}", flush=True)
    results = []
    for name in chosen:
        results.append(run_variant(name, work_dir, cache_dir, third_party))
        print(json.dumps(results[-1]), flush=True)
    if results:
        print("| variant | what | steps x tokens | eval loss | train loss | stdlib nats/token "
              "| train split nats/token | stdlib bits/byte | general bits/byte | jax bits/byte "
              "| CPU s | wall s | CPU some avg10 % |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
              "| --- |")
        for r in results:
            shape = f"{r['steps']} x {r['tokens'] // r['steps']:,} tokens"
            print(f"| {r['name']} | {describe(r['name'])} | {shape} | {r['eval_loss']:.3f} | "
                  f"{r['train_loss']:.3f} | {r['stdlib_nats']:.3f} | {r['train_split_nats']:.3f} | "
                  f"{r['stdlib_bpb']:.3f} | "
                  f"{r['general_bpb']:.3f} | {r['jax_bpb']:.3f} | {r['cpu_s']:.0f} | "
                  f"{r['wall_s']:.0f} | "
                  f"{r['pressure']} |")
        print("\nLast logged samples:\n")
        for r in results:
            print(f"* {r['name']} (step {r['steps']}): `{r['sample']}`")
    if _TIMED.value:
        t = timed_first_run(_TIMED.value, work_dir)
        print(json.dumps(t), flush=True)
        print(f"\nfirst run of {t['name']} from nothing: {t['wall_s']:.0f} s wall, "
              f"{t['cpu_s']:.0f} s CPU, /proc/pressure/cpu some avg10 {t['pressure']} % "
              "(before/after)")


if __name__ == "__main__":
    flags.mark_flag_as_required("work_dir")
    app.run(main)
