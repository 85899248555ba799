"""Tokens/s of the data pipeline (read + tokenize + pack + batch) with 0, 1, 2 grain workers.

    python benchmarks/data_throughput.py --cache_dir=/tmp/jaxlm_bench_cache

Uses the default config (source=stdlib, 8192-token BPE trained on first use, seq_len 256) and
prints a markdown table. Startup is the time to the first batch (worker processes included);
tokens/s is measured over the following --batches batches. The first run also reports the time
to build the corpus and train the tokenizer; later runs find both in the cache.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm.data import pipeline  # noqa: E402
from jaxlm.data.config import default_data_config  # noqa: E402

_CACHE_DIR = flags.DEFINE_string("cache_dir", "/tmp/jaxlm_bench_cache", "Corpus/tokenizer cache.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to measure.")
_BATCHES = flags.DEFINE_integer("batches", 300, "Batches timed per setting.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Rows per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")


def measure(num_workers: int, tokenizer) -> tuple[float, float]:
    """(startup seconds, tokens/s) of one setting."""
    data = default_data_config()
    data.seq_len = _SEQ_LEN.value
    data.num_workers = num_workers
    t0 = time.perf_counter()
    it = pipeline.make_pretrain_iterator(data, tokenizer, split="train",
                                         batch_size=_BATCH_SIZE.value,
                                         cache_dir=_CACHE_DIR.value)
    next(it)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(_BATCHES.value):
        next(it)
    seconds = time.perf_counter() - t1
    it.close()
    return startup, _BATCHES.value * _BATCH_SIZE.value * _SEQ_LEN.value / seconds


def main(argv: list[str]) -> None:
    del argv
    t0 = time.perf_counter()
    tokenizer = pipeline.load_or_train_tokenizer(default_data_config(), _CACHE_DIR.value)
    print(f"corpus + tokenizer ready in {time.perf_counter() - t0:.1f}s ({tokenizer.path})\n")
    print(f"batch {_BATCH_SIZE.value} x seq_len {_SEQ_LEN.value}, source=stdlib, "
          f"vocab {tokenizer.vocab_size}, {os.cpu_count()} CPU cores\n")
    print("| grain workers | startup (s) | tokens/s |")
    print("| ---: | ---: | ---: |")
    for workers in _WORKERS.value:
        startup, tokens_per_s = measure(int(workers), tokenizer)
        print(f"| {workers} | {startup:.2f} | {tokens_per_s:,.0f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
