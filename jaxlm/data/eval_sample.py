"""The held-out sample of an in-training evaluation: a token budget drawn across the whole split.

Reading the held-out split in file order and stopping after a budget scores whatever files come
first: on the stdlib corpus 32k tokens covered 7 of its 15 held-out files, 45% of them one
charmap table, and reported a loss more than a nat below the model's real held-out loss. Here
whole documents are drawn in one fixed random order of the whole split (`EVAL_ORDER_SEED`, the
order the eval iterator also reads) into a pool of `POOL_FACTOR` times the budget and at least
`POOL_DOCUMENTS` documents (or the whole split, when that is smaller), packed into rows, and the
budget's worth of rows is drawn from the pool uniformly. Every token of the split is equally
likely to be scored, so the sample follows the split's mix; drawing rows rather than whole
documents keeps one long document from filling the budget by chance, and the document floor
keeps one long document from filling the pool. When the split is smaller than the budget it is
scored whole, once. The sample depends on neither data.seed nor the number of processes, and is
the same at every evaluation.

Every process packs the same global sample and keeps its own rows of each global batch (as
data.process_sharding="rows" does); the last batch is filled with padding rows, whose
loss_mask is 0. A mixture gives each component its weight's share of the budget.

    sample = make_eval_sample(config.data, tokenizer, tokens=65_536, batch_size=16,
                              process_index=jax.process_index(),
                              process_count=jax.process_count(), cache_dir=cache_dir)
    for batch in sample.batches: ...   # dicts of [batch_size, seq_len] arrays
    logging.info(sample.describe())
"""

from __future__ import annotations

import dataclasses

import grain
import ml_collections
import numpy as np
from absl import logging

from jaxlm.data import config as config_lib
from jaxlm.data import sources
from jaxlm.data.packing import PackedRowsIterDataset
from jaxlm.data.pipeline import EVAL_ORDER_SEED, DocumentSet, ToTokens, document_sets, eval_order
from jaxlm.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
# The pool of documents the rows are drawn from holds this many times the token budget ...
POOL_FACTOR = 4
# ... and at least this many documents (a long document drawn first cannot be the whole pool).
POOL_DOCUMENTS = 256


@dataclasses.dataclass(frozen=True)
class EvalSample:
    """This process's eval batches and what the whole (all-process) sample covers."""

    batches: list[Batch]
    # Held-out documents with scored tokens in the sample.
    documents: int
    # Distinct files those documents come from.
    files: int
    # Scored target tokens of the sample over all processes (the loss_mask sum).
    tokens: int
    # Documents of the held-out split the sample is drawn from.
    split_documents: int
    # True when the budget covers the whole split.
    whole_split: bool

    def describe(self) -> str:
        what = ("the whole held-out split" if self.whole_split else
                f"a fixed sample of the {self.split_documents} held-out documents")
        rows = sum(len(b["inputs"]) for b in self.batches)
        return (f"eval sample: {self.documents} documents from {self.files} files, "
                f"{self.tokens:,} tokens ({what}); {len(self.batches)} batches, {rows} rows in "
                "this process")


@dataclasses.dataclass
class _Pool:
    """Whole documents drawn in the fixed eval order: their tokens and files."""

    arrays: list[np.ndarray]
    files: list[str]
    whole: bool


def _draw(ds: DocumentSet, to_tokens: ToTokens, budget: int) -> _Pool:
    """Whole documents in the fixed eval order until they hold `budget` tokens and number
    POOL_DOCUMENTS (or all)."""
    n = len(ds.docs)
    order = eval_order(n)
    pool = _Pool([], [], whole=True)
    used = 0
    for i in range(n):
        if used >= budget and len(pool.arrays) >= POOL_DOCUMENTS:
            pool.whole = False
            break
        index = int(order[i])
        ids = to_tokens.map(ds.docs[index])
        if isinstance(ids, sources.Skipped) or ids.size < 2:  # one token predicts nothing
            continue
        pool.arrays.append(ids)
        pool.files.append(f"{ds.name}:{ds.file_of(index)}" if ds.file_of else ds.name)
        used += len(ids)
    return pool


def _rows(pool: _Pool, num_rows: int, seq_len: int, pad_id: int,
          name: str) -> tuple[list[Batch], list[int], bool]:
    """`num_rows` rows drawn uniformly (fixed seed) from the packed pool, in pool order; the pool
    documents with scored targets in them; and whether that is every row of the pool."""
    stream = grain.MapDataset.source(pool.arrays).to_iter_dataset()
    rows = list(PackedRowsIterDataset(stream, seq_len=seq_len, pad_id=pad_id,
                                      max_empty_run=len(pool.arrays) + 16, name=name))
    chosen = np.sort(np.random.default_rng(EVAL_ORDER_SEED).permutation(len(rows))[:num_rows])
    # Document d is stream tokens [start_d, end_d); its scored targets are start_d + 1 ...
    # end_d - 1, and row r's are r * seq_len + 1 ... r * seq_len + seq_len.
    ends = np.cumsum([len(a) for a in pool.arrays])
    starts = ends - np.array([len(a) for a in pool.arrays])
    covered: set[int] = set()
    for r in chosen.tolist():
        first = int(np.searchsorted(ends, r * seq_len + 1, side="right"))
        last = int(np.searchsorted(starts, r * seq_len + seq_len, side="left"))
        covered.update(range(first, last))
    return [rows[r] for r in chosen.tolist()], sorted(covered), len(chosen) == len(rows)


def _pad_row(seq_len: int, pad_id: int) -> Batch:
    return {"inputs": np.full(seq_len, pad_id, np.int32),
            "targets": np.full(seq_len, pad_id, np.int32),
            "segment_ids": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32),
            "loss_mask": np.zeros(seq_len, np.float32)}


def make_eval_sample(data: ml_collections.ConfigDict, tokenizer: Tokenizer, *, tokens: int,
                     batch_size: int, process_index: int = 0, process_count: int = 1,
                     cache_dir: str) -> EvalSample:
    """About `tokens` held-out tokens (all processes together) drawn across the whole eval split
    and packed into batches; this process gets rows [process_index * batch_size, ...) of each
    global batch of batch_size * process_count rows. Logs what the sample covers."""
    config_lib.check_data_config(data)
    if tokens < 1:
        raise ValueError(f"the eval token budget must be >= 1, got {tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    sets = document_sets(data, tokenizer, "eval", cache_dir)
    to_tokens = ToTokens(tokenizer, data.add_bos, data.add_eos)
    total_weight = sum(s.weight for s in sets)
    rows: list[Batch] = []
    documents, files, whole = 0, set(), True
    for s in sets:
        share = max(1, round(tokens * s.weight / total_weight))
        pool = _draw(s, to_tokens, POOL_FACTOR * share)
        num_rows = -(-share // data.seq_len)
        picked, covered, every_row = _rows(pool, num_rows, data.seq_len, tokenizer.pad_id,
                                           f"{s.name} (eval sample)")
        rows += picked
        documents += len(covered)
        files |= {pool.files[d] for d in covered}
        whole = whole and pool.whole and every_row
    if not rows:
        raise ValueError(f"the held-out documents of {[s.name for s in sets]} hold no tokens")
    global_rows = batch_size * process_count
    rows += [_pad_row(data.seq_len, tokenizer.pad_id)] * (-len(rows) % global_rows)
    batches = []
    for start in range(0, len(rows), global_rows):
        mine = rows[start + process_index * batch_size:start + (process_index + 1) * batch_size]
        batches.append({k: np.stack([r[k] for r in mine]) for k in mine[0]})
    sample = EvalSample(batches=batches, documents=documents, files=len(files),
                        tokens=int(sum(r["loss_mask"].sum() for r in rows)),
                        split_documents=sum(len(s.docs) for s in sets), whole_split=whole)
    logging.info("%s", sample.describe())
    return sample
