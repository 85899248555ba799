"""What deduplication removes from the embedded stdlib corpus, per data.dedup mode.

    python benchmarks/corpus_dedup.py --cache_dir=/tmp/jaxlm_dedup_cache

Builds the corpus with data.dedup = off, exact and near (the default), and prints a markdown
table: documents kept and removed (exact / near copies), characters and tokens removed, the
`encodings/` files' share of the training tokens, and the contamination check (held-out
documents whose MinHash signature still matches a training document at the threshold). Tokens
are counted with one tokenizer for every row: the default 8192-token BPE trained on the
corpus without dedup. About half a minute on 2 cores, most of it tokenizing.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm.data import corpus, dedup, pipeline, sources  # noqa: E402
from jaxlm.data.config import default_data_config  # noqa: E402

_CACHE_DIR = flags.DEFINE_string("cache_dir", "/tmp/jaxlm_dedup_cache", "Corpus cache.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.8, "data.dedup_threshold.")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.02, "data.eval_fraction.")


def _documents(built: corpus.StdlibCorpus, split: str) -> list[tuple[str, str]]:
    """(file, text) of every document of a split, in record order."""
    source = sources.TextRecordSource([built.path(split)])
    file_of = built.file_of(split)
    return [(file_of(i), source[i]) for i in range(len(source))]


def _contamination_without_dedup(built: corpus.StdlibCorpus, threshold: float) -> int:
    fingerprint = dedup.Fingerprinter()

    def signed(split: str) -> list:
        out = []
        for k, (name, text) in enumerate(_documents(built, split)):
            fp = fingerprint(text)
            if fp is not None:
                out.append((fp.signature_P, f"{name}#{k}"))
        return out

    return dedup.find_contamination(signed("eval"), signed("train"), threshold).documents


def main(argv: list[str]) -> None:
    del argv
    data = default_data_config()
    data.dedup, data.eval_fraction = "off", _EVAL_FRACTION.value
    t0 = time.perf_counter()
    tokenizer = pipeline.load_or_train_tokenizer(data, _CACHE_DIR.value)
    print(f"tokenizer {tokenizer.path} ready in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = []
    baseline = None
    for mode in ("off", "exact", "near"):
        settings = dedup.Settings(mode, _THRESHOLD.value)
        built = corpus.build_stdlib_corpus(_CACHE_DIR.value, eval_fraction=data.eval_fraction,
                                           dedup=settings)
        tokens = chars = docs = train_tokens = charmap_tokens = 0
        for split in ("train", "eval"):
            for name, text in _documents(built, split):
                n = len(tokenizer.encode(text))
                tokens, chars, docs = tokens + n, chars + len(text), docs + 1
                if split == "train":
                    train_tokens += n
                    charmap_tokens += n if name.startswith("encodings/") else 0
        if baseline is None:
            baseline = (docs, chars, tokens)
        report = built.dedup
        contaminated = (report.contamination.documents if report.contamination is not None
                        else _contamination_without_dedup(built, _THRESHOLD.value))
        rows.append(
            f"| {mode} | {docs:,} | {report.exact_documents} | {report.near_documents} | "
            f"{baseline[1] - chars:,} ({100 * (baseline[1] - chars) / baseline[1]:.1f}%) | "
            f"{baseline[2] - tokens:,} ({100 * (baseline[2] - tokens) / baseline[2]:.1f}%) | "
            f"{100 * charmap_tokens / train_tokens:.1f}% | "
            f"{contaminated} of {built.num_documents['eval']} |")
    print(f"\nstdlib corpus, Python {sys.version.split()[0]}, eval_fraction "
          f"{data.eval_fraction}, threshold {_THRESHOLD.value}, tokens of {tokenizer.path}\n")
    print("| data.dedup | documents | exact copies removed | near copies removed | "
          "characters removed | tokens removed | `encodings/` share of train tokens | "
          "held-out docs near a train doc |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
