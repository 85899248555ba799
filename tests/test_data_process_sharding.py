"""data.process_sharding="rows": every process's share is its rows of one global batch."""

import numpy as np

from jaxlm.data.pipeline import load_or_train_tokenizer, make_pretrain_iterator
from jaxlm.run.config import base_config


def _batches(data, tok, cache, *, batch_size, index, count, n=3):
    it = make_pretrain_iterator(data, tok, split="train", batch_size=batch_size,
                                process_index=index, process_count=count, cache_dir=cache)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def test_rows_mode_splits_the_same_global_batches_for_any_process_count(tmp_path):
    data = base_config().data
    data.seq_len, data.vocab_size, data.max_documents = 32, 400, 60
    data.process_sharding = "rows"
    cache = str(tmp_path)
    tok = load_or_train_tokenizer(data, cache)
    whole = _batches(data, tok, cache, batch_size=8, index=0, count=1)
    halves = [_batches(data, tok, cache, batch_size=4, index=i, count=2) for i in range(2)]
    quarters = [_batches(data, tok, cache, batch_size=2, index=i, count=4) for i in range(4)]
    for step in range(3):
        for key in whole[step]:
            np.testing.assert_array_equal(
                np.concatenate([h[step][key] for h in halves]), whole[step][key])
            np.testing.assert_array_equal(
                np.concatenate([q[step][key] for q in quarters]), whole[step][key])
