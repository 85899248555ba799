"""jaxlm.inference.scoring: the packing plan (every sequence once, full rows, few shapes) and
packed rows scoring each sequence as it scores alone, for Llama-style (RoPE) and GPT-2-style
(learned positions) models."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from jaxlm.inference import scoring
from jaxlm.models import Transformer
from tests.model_fixtures import GPT2_TINY, LLAMA_TINY, init_params

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds


def _check_plan(lengths, batches, num_rows, max_len):
    seen = []
    for b in batches:
        assert len(b.placed) <= b.rows == num_rows
        assert b.row_len == scoring.length_bucket(max(lengths[i] for row in b.placed
                                                      for i, _ in row), max_len)
        for row in b.placed:
            end = 0
            for i, start in row:  # in order, not overlapping, inside the row
                assert start == end
                end = start + lengths[i]
                seen.append(i)
            assert end <= b.row_len
    assert sorted(seen) == list(range(len(lengths)))


def test_pack_places_every_sequence_once_in_few_shapes_with_full_rows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 129, 300).tolist() + [128] * 40
    batches = scoring.pack(lengths, num_rows=8, max_len=128)
    _check_plan(lengths, batches, 8, 128)
    assert {b.row_len for b in batches} <= {16, 32, 64, 128}
    slots = sum(b.rows * b.row_len for b in batches)
    assert sum(lengths) / slots > 0.9  # one row per sequence would fill about 0.5
    assert scoring.pack(lengths, num_rows=8, max_len=128) == batches  # deterministic


def test_pack_fills_the_gaps_of_long_rows_with_short_sequences():
    batches = scoring.pack([100, 20, 100, 28, 5], num_rows=2, max_len=128)
    assert len(batches) == 1 and batches[0].row_len == 128
    assert batches[0].placed == [[(0, 0), (3, 100)], [(2, 0), (1, 100), (4, 120)]]
    small = scoring.pack([3, 9, 2], num_rows=4, max_len=128)
    assert [b.row_len for b in small] == [16] and small[0].placed == [[(1, 0), (0, 9), (2, 12)]]
    with pytest.raises(ValueError, match="at least one token"):
        scoring.pack([4, 0], num_rows=2, max_len=16)


def test_packed_arrays_give_each_sequence_its_segment_and_positions():
    seqs = [([5, 6, 7], [6, 7, 8]), ([9], [10])]
    batch = scoring.PackedBatch(row_len=16, rows=2, placed=[[(0, 0), (1, 3)]])
    a = batch.arrays(seqs, pad_id=0)
    assert a["inputs"][0, :5].tolist() == [5, 6, 7, 9, 0]
    assert a["targets"][0, :4].tolist() == [6, 7, 8, 10]
    assert a["segment_ids"][0, :5].tolist() == [1, 1, 1, 2, 0]
    assert a["positions"][0, :4].tolist() == [0, 1, 2, 0]
    assert not a["segment_ids"][1].any()  # an empty row is all padding


@pytest.mark.parametrize("cfg", [LLAMA_TINY, GPT2_TINY], ids=["rope", "learned"])
def test_packed_rows_score_each_sequence_as_alone(cfg):
    cfg = dataclasses.replace(cfg, max_seq_len=32)
    model = Transformer(cfg)
    params = init_params(model.cfg, 0)
    rng = np.random.default_rng(1)
    tokens = [rng.integers(1, cfg.vocab_size, int(n) + 1).tolist()
              for n in rng.integers(1, 32, 20)]  # + 1 fits a row of 32
    seqs = [(t[:-1], t[1:]) for t in tokens]
    packed = jax.jit(functools.partial(scoring.packed_logprobs, model),
                     static_argnames=("greedy",))
    alone = jax.jit(functools.partial(scoring.token_logprobs, model))
    logits_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    shared = 0
    for batch in scoring.pack([len(x) for x, _ in seqs], num_rows=4, max_len=32):
        a = batch.arrays(seqs, pad_id=0)
        logp, hits = packed(params, a["inputs"], a["targets"], a["positions"],
                            a["segment_ids"], greedy=True)
        assert not np.any(np.asarray(logp)[a["segment_ids"] == 0])
        for r, row in enumerate(batch.placed):
            shared += len(row) > 1
            for i, start in row:
                n = len(seqs[i][0])
                # alone: one right-padded row (causal: the padding after it changes nothing)
                row_1x32 = np.zeros((1, 32), np.int32)
                row_1x32[0, :n + 1] = tokens[i]
                want = alone(params, row_1x32, np.arange(32)[None] <= n)[0, :n]
                np.testing.assert_allclose(logp[r, start:start + n], want, rtol=1e-5,
                                           atol=1e-5)
                argmax = np.asarray(logits_fn(params, row_1x32)[0, :n]).argmax(-1)
                np.testing.assert_array_equal(hits[r, start:start + n],
                                              argmax == np.asarray(seqs[i][1]))
    assert shared > 0  # some rows really held several sequences
