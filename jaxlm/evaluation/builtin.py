"""Built-in offline evals: no download, built from the standard-library source every Python
ships (the held-out documents of the embedded corpus, `jaxlm.data.corpus`).

    corpus_bpb       held-out documents, whole: token perplexity and bits per UTF-8 byte
                     (rolling log-likelihood in windows of the model's context)
    next_line        multiple choice: which of 4 lines follows the given lines of code
                     (acc: highest log-likelihood; acc_norm: per byte of the choice)
    line_completion  generation: finish a line of code given its first half and the lines
                     before it, greedy until the newline; exact_match of the rest of the line

The documents are those the in-training evaluation samples (`HeldOut`): the eval split of the
deduplicated stdlib corpus a run builds (with the run's split and dedup settings when it trains
on the stdlib corpus), read in the one fixed eval order (`jaxlm.data.pipeline.eval_order`), so
any number of them is a uniform sample of the split, and `corpus_bpb` over the whole split
measures what the in-training eval samples. They depend only on this Python's standard library
and fixed seeds, so two checkpoints evaluated on one machine see the same data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Callable
from typing import Any

import ml_collections

from jaxlm.data import cache, corpus, pipeline
from jaxlm.data import config as data_config
from jaxlm.data.sources import TextRecordSource
from jaxlm.evaluation.engine import Engine, Progress, bits_per_byte

# Default examples per task (eval.limit / --limit override); corpus_bpb: documents, at least
# the whole held-out split of the stdlib corpus (87 documents, about 75k tokens).
DEFAULT_LIMITS = {"corpus_bpb": 128, "next_line": 96, "line_completion": 48}
_CONTEXT_LINES = 4
_SEED = 0
_MAX_NEW_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Which held-out stdlib documents the tasks read: the eval split of the corpus built with
    these settings, cached under `cache_dir` (a run's cache holds it already)."""

    cache_dir: str = dataclasses.field(default_factory=cache.default_cache_dir)
    eval_fraction: float = 0.02
    max_documents: int = 0
    dedup: str = "near"
    dedup_threshold: float = 0.8

    @classmethod
    def of_run(cls, data: ml_collections.ConfigDict, cache_dir: str) -> HeldOut:
        """The run's own held-out split when it trains on the stdlib corpus (data.source),
        else the default corpus's."""
        d = data if data.source == "stdlib" else data_config.default_data_config()
        return cls(cache_dir, float(d.eval_fraction), int(d.max_documents), str(d.dedup),
                   float(d.dedup_threshold))

    def documents(self) -> tuple[str, ...]:
        """The split's documents in the fixed eval order."""
        return _documents(self)


@functools.lru_cache(maxsize=4)
def _documents(heldout: HeldOut) -> tuple[str, ...]:
    data = data_config.default_data_config()
    data.dedup, data.dedup_threshold = heldout.dedup, heldout.dedup_threshold
    built = corpus.build_stdlib_corpus(heldout.cache_dir, eval_fraction=heldout.eval_fraction,
                                       max_documents=heldout.max_documents,
                                       dedup=data_config.dedup_settings(data))
    source = TextRecordSource([built.path("eval")])
    return tuple(source[int(i)] for i in pipeline.eval_order(len(source)))


@functools.lru_cache(maxsize=4)
def _code_lines(heldout: HeldOut) -> list[tuple[list[str], int]]:
    """(lines of a document, index of a line worth predicting) pairs, shuffled with a fixed
    seed: lines of 12-80 characters with at least _CONTEXT_LINES lines before them."""
    spots = []
    for doc in heldout.documents():
        lines = doc.split("\n")
        for j in range(_CONTEXT_LINES, len(lines)):
            if 12 <= len(lines[j].strip()) <= 80 and not lines[j].strip().startswith("#"):
                spots.append((lines, j))
    random.Random(_SEED).shuffle(spots)
    return spots


def _context(lines: list[str], j: int) -> str:
    return "\n".join(lines[j - _CONTEXT_LINES:j]) + "\n"


def corpus_bpb(engine: Engine, limit: int, progress: Progress | None = None,
               heldout: HeldOut | None = None) -> dict[str, float]:
    docs = list((heldout or HeldOut()).documents()[:limit])
    tokens = [engine.tokenizer.encode(d, special=False) for d in docs]
    logps = engine.loglikelihood_rolling(tokens, progress)
    nll = -sum(logps)
    num_tokens, num_bytes = sum(len(t) for t in tokens), sum(len(d.encode()) for d in docs)
    return {"bits_per_byte": bits_per_byte(nll, num_bytes),
            "token_perplexity": math.exp(nll / max(num_tokens, 1)),
            "documents": len(docs), "tokens": num_tokens, "bytes": num_bytes}


def next_line_examples(limit: int, heldout: HeldOut | None = None) -> list[dict[str, Any]]:
    spots = _code_lines(heldout or HeldOut())
    rng = random.Random(_SEED + 1)
    examples = []
    for lines, j in spots[:limit]:
        answer = lines[j]
        others: list[str] = []
        while len(others) < 3:
            dl, dj = spots[rng.randrange(len(spots))]
            if dl[dj] != answer and dl[dj] not in others:
                others.append(dl[dj])
        gold = rng.randrange(4)
        choices = others[:gold] + [answer] + others[gold:]
        examples.append({"context": _context(lines, j), "choices": choices, "gold": gold})
    return examples


def next_line(engine: Engine, limit: int, progress: Progress | None = None,
              heldout: HeldOut | None = None) -> dict[str, float]:
    examples = next_line_examples(limit, heldout)
    tok = engine.tokenizer
    pairs = []
    for ex in examples:
        ctx = tok.encode(ex["context"])
        pairs += [(ctx, tok.encode(c + "\n", special=False)) for c in ex["choices"]]
    scores = [s for s, _ in engine.loglikelihood(pairs, progress)]
    acc = acc_norm = 0
    for i, ex in enumerate(examples):
        row = scores[4 * i:4 * i + 4]
        per_byte = [s / len((c + "\n").encode()) for s, c in zip(row, ex["choices"])]
        acc += row.index(max(row)) == ex["gold"]
        acc_norm += per_byte.index(max(per_byte)) == ex["gold"]
    n = max(len(examples), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "examples": len(examples)}


def line_completion_examples(limit: int, heldout: HeldOut | None = None
                             ) -> list[dict[str, str]]:
    examples = []
    for lines, j in _code_lines(heldout or HeldOut())[-limit:] if limit else []:
        line = lines[j]
        indent = len(line) - len(line.lstrip())
        body = line[indent:]
        cut = body.rfind(" ", 0, len(body) // 2 + 1)
        cut = indent + (cut + 1 if cut > 0 else len(body) // 2)
        examples.append({"context": _context(lines, j) + line[:cut], "target": line[cut:]})
    return examples


def line_completion(engine: Engine, limit: int, progress: Progress | None = None,
                    heldout: HeldOut | None = None) -> dict[str, float]:
    examples = line_completion_examples(limit, heldout)
    tok = engine.tokenizer
    texts = engine.generate_until([tok.encode(ex["context"]) for ex in examples],
                                  [["\n"]] * len(examples),
                                  [_MAX_NEW_TOKENS] * len(examples), progress)
    hits = sum(t.rstrip() == ex["target"].rstrip() for t, ex in zip(texts, examples))
    return {"exact_match": hits / max(len(examples), 1), "examples": len(examples)}


TASKS: dict[str, Callable[..., dict[str, float]]] = {
    "corpus_bpb": corpus_bpb, "next_line": next_line, "line_completion": line_completion}


def requests_of(name: str, limit: int) -> int:
    """Number of engine requests (batch rows) a task makes, for the progress bar."""
    if name == "next_line":
        return 4 * limit
    return limit
