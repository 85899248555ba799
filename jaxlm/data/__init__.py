"""Data for jaxlm: corpora, tokenizers, prepared shards and the grain input pipeline.

Modules, one concept each:
  config     the `data` config section, its checks and string formats (no grain/JAX import)
  corpus     the embedded default corpus built from this Python's standard library
  tokenizer  sentencepiece behind a small interface, and lossless tokenizer training
  dedup      exact and MinHash near-duplicate removal before the split, decontamination check
  sources    random-access documents of raw files, text corpora and token shards
  shards     the on-disk format of prepared token shards and their manifest
  prepare    tokenizing raw files into shards with worker processes
  packing    packing documents into next-token rows with segment ids and positions
  pipeline   the grain pipeline: shuffle, shard by process, tokenize, pack, mix, batch
  eval_sample  the held-out sample of an evaluation: a token budget drawn across the split
  cache      atomic, content-keyed entries of the cache directory

Nothing is imported here, so `import jaxlm.data.config` stays cheap.
"""
