"""Checkpoints: restore onto another mesh, retention, data position, params-only, crash safety."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.data import pipeline
from jaxlm.models import Transformer
from jaxlm.parallel import sharding
from jaxlm.run.checkpoint import Checkpointer, complete_steps, restore_params
from jaxlm.run.config import base_config
from jaxlm.run.optim import make_optimizer
from jaxlm.run.train_state import init_sharded_state, state_shardings
from tests import data_fixtures as F
from tests.cli import xla_flags
from tests.model_fixtures import LLAMA_TINY

SEQ_LEN = 16
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(**sizes):
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1, **sizes})


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def run():
    """A tiny Llama TrainState on an fsdp=8 mesh, and the shardings of data=2,fsdp=2,tensor=2."""
    model = Transformer(LLAMA_TINY)
    config = base_config()
    tx = make_optimizer(config.optim, 10)
    state, _ = init_sharded_state(model, tx, _mesh(fsdp=8), jax.random.key(0), SEQ_LEN)
    state = state.replace(step=state.step + 7)
    other = state_shardings(model, tx, _mesh(data=2, fsdp=2, tensor=2), SEQ_LEN)
    return {"config": config, "state": state, "other": other}


def _small_state(value: float):
    """A cheap sharded pytree for the tests that are about files, not models."""
    mesh = _mesh(fsdp=8)
    w = jax.device_put(np.arange(64 * 8, dtype=np.float32).reshape(64, 8) + value,
                       NamedSharding(mesh, P("fsdp")))
    return {"w": w, "step": jax.device_put(np.int32(value), NamedSharding(mesh, P()))}


def _small_abstract():
    state = _small_state(0.0)
    return _abstract(state, jax.tree.map(lambda x: x.sharding, state))


@pytest.mark.slow
def test_restore_onto_another_mesh_with_config_and_extra(run, tmp_path):
    state, other = run["state"], run["other"]
    extra = {"tokenizer_path": "/tok.model", "tokenizer_sha256": "ab" * 32}
    with Checkpointer(str(tmp_path), save_every=10, keep_last=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(7, state, config=run["config"], extra=extra)
        ckpt.wait()
    with Checkpointer(str(tmp_path), save_every=10, keep_last=2) as ckpt:
        assert ckpt.latest_step() == 7
        restored = ckpt.restore(7, _abstract(state, other))
        assert ckpt.read_json(7, "extra") == extra
        assert ckpt.read_json(7, "config")["model"]["d_model"] == run["config"].model.d_model
    _assert_trees_equal(restored, state)
    assert int(restored.step) == 7
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(other)):
        assert leaf.sharding == want
    # Saved with embed over fsdp=8, restored with embed over (tensor, fsdp).
    assert restored.params["embed"].sharding.spec != state.params["embed"].sharding.spec


@pytest.mark.slow
def test_clear_errors_for_missing_step_and_wrong_shapes(run, tmp_path):
    state, other = run["state"], run["other"]
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        restore_params(missing, None, _abstract(state.params, other.params))
    with Checkpointer(str(tmp_path / "run"), save_every=1, keep_last=1,
                      async_save=False) as ckpt:
        ckpt.save(3, state)
        with pytest.raises(FileNotFoundError, match=r"step 4 .*run.*\[3\]"):
            ckpt.restore(4, _abstract(state, other))
        wrong = _abstract(state, other)
        embed = wrong.params["embed"]
        wrong.params["embed"] = jax.ShapeDtypeStruct((embed.shape[0] // 2, embed.shape[1]),
                                                     embed.dtype, sharding=embed.sharding)
        with pytest.raises(ValueError, match=r"run/3/state: parameter params/embed has shape"):
            ckpt.restore(3, wrong)
        with pytest.raises(ValueError, match=r"parameter params/embed has shape"):
            restore_params(str(tmp_path / "run"), 3, wrong.params)
        with pytest.raises(ValueError, match="no sharding"):
            ckpt.restore(3, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                         state))
        with pytest.raises(FileNotFoundError, match="data iterator"):
            ckpt.restore(3, _abstract(state, other), data_iterator=iter([]))


def test_should_save_every_n_steps_and_at_the_final_step(tmp_path):
    ckpt = Checkpointer(str(tmp_path), save_every=4, keep_last=1)
    assert [s for s in range(1, 11) if ckpt.should_save(s, 10)] == [4, 8, 10]
    ckpt.close()
    final_only = Checkpointer(str(tmp_path), save_every=0, keep_last=1)
    assert [s for s in range(1, 11) if final_only.should_save(s, 10)] == [10]
    final_only.close()


def test_retention_keeps_last_n_plus_every_multiple_of_keep_every(tmp_path):
    with Checkpointer(str(tmp_path), save_every=2, keep_last=2, keep_every=4) as ckpt:
        for step in range(1, 11):
            if ckpt.should_save(step, 11):
                assert ckpt.save(step, _small_state(step))
        ckpt.wait()
        # Saved 2, 4, 6, 8, 10: the newest two (8, 10) plus the multiples of 4 (4, 8).
        assert ckpt.all_steps() == [4, 8, 10]
        assert sorted(os.listdir(tmp_path)) == ["10", "4", "8"]
        # An existing step is not written twice; an older one only when forced.
        assert not ckpt.save(10, _small_state(0))
        assert not ckpt.save(9, _small_state(9))
        assert ckpt.save(9, _small_state(9), force=True)
        ckpt.wait()
        assert ckpt.latest_step() == 10
        _assert_trees_equal(ckpt.restore(4, _small_abstract()), _small_state(4))


def test_async_save_then_wait_is_readable_even_if_the_state_is_donated(tmp_path):
    state = _small_state(1.0)
    expected = jax.device_get(state)
    with Checkpointer(str(tmp_path), save_every=1, keep_last=2, async_save=True) as ckpt:
        ckpt.save(1, state)
        # What the train step does right after a save: donate the state's buffers.
        jax.jit(lambda s: jax.tree.map(lambda x: x * 0 - 1, s), donate_argnums=0)(state)
        # (Whether the backend really frees the donated buffer while orbax still holds a
        # reference is up to it; what matters is that the checkpoint below is intact.)
        ckpt.wait()
        assert ckpt.latest_step() == 1
    assert complete_steps(str(tmp_path)) == [1]
    with Checkpointer(str(tmp_path), save_every=1, keep_last=2) as fresh:
        _assert_trees_equal(fresh.restore(1, _small_abstract()), expected)


def test_data_iterator_position_round_trips(tmp_path):
    tok = F.train_tiny_tokenizer(str(tmp_path / "tok"))
    F.write_jsonl(str(tmp_path / "docs.jsonl"), F.synthetic_documents(120, seed=3))
    data = F.files_config(str(tmp_path / "docs.jsonl"), prefetch_buffer_size=2)

    def make_iterator():
        return pipeline.make_pretrain_iterator(data, tok, split="train", batch_size=2,
                                               cache_dir=str(tmp_path / "cache"))

    it = make_iterator()
    F.take(it, 3)
    with Checkpointer(str(tmp_path / "ckpt"), save_every=3, keep_last=1) as ckpt:
        ckpt.save(3, _small_state(3), data_iterator=it)
        expected = F.take(it, 2)  # taken while the save may still be writing
        ckpt.wait()
    it.close()
    assert "process_0-of-1.json" in os.listdir(tmp_path / "ckpt" / "3" / "data")

    fresh = make_iterator()
    with Checkpointer(str(tmp_path / "ckpt"), save_every=3, keep_last=1) as ckpt:
        _assert_trees_equal(ckpt.restore(3, _small_abstract(), data_iterator=fresh),
                            _small_state(3))
    F.assert_batches_equal(expected, F.take(fresh, 2))
    fresh.close()


def test_restore_params_takes_only_params_from_the_latest_step(run, tmp_path):
    state, other = run["state"], run["other"]
    later = state.replace(params=jax.tree.map(lambda x: x + 1, state.params))
    with Checkpointer(str(tmp_path), save_every=1, keep_last=3) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, later)
    params = restore_params(str(tmp_path), None, _abstract(state.params, other.params))
    _assert_trees_equal(params, later.params)
    for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(other.params)):
        assert leaf.sharding == want
    _assert_trees_equal(restore_params(str(tmp_path), 1, _abstract(state.params, other.params)),
                        state.params)


# A process that saves step 2 and is SIGKILLed just before orbax renames the finished temporary
# directory into place: exactly what a crash in the middle of a save leaves on disk.
_CRASHING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import orbax.checkpoint as ocp
    from tests.test_checkpoint import _small_state
    from jaxlm.run.checkpoint import Checkpointer

    def crash(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = crash
    ckpt = Checkpointer(sys.argv[1], save_every=1, keep_last=3)
    ckpt.save(2, _small_state(2.0))
    ckpt.wait()
    print("the save finished: the crash was not simulated")
""")


def test_checkpoint_killed_mid_save_is_ignored(tmp_path):
    directory = str(tmp_path)
    with Checkpointer(directory, save_every=1, keep_last=3) as ckpt:
        ckpt.save(1, _small_state(1.0))
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    proc = subprocess.run([sys.executable, "-c", _CRASHING_SAVE, directory], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    assert "2.orbax-checkpoint-tmp" in os.listdir(directory)
    assert complete_steps(directory) == [1]

    with Checkpointer(directory, save_every=1, keep_last=3) as resumed:
        assert resumed.latest_step() == 1
        _assert_trees_equal(resumed.restore(1, _small_abstract()), _small_state(1.0))
        with pytest.raises(FileNotFoundError, match="step 2"):
            resumed.restore(2, _small_abstract())
        # The resumed run reaches step 2 again and saves it over the leftover.
        assert resumed.save(2, _small_state(2.0))
        resumed.wait()
        assert resumed.latest_step() == 2
        _assert_trees_equal(resumed.restore(2, _small_abstract()), _small_state(2.0))
    assert not any("tmp" in name for name in os.listdir(directory))



# One of two JAX processes (4 CPU devices each) that save a state sharded over all 8 devices with
# each process's own data position, then restore onto another mesh.
_TWO_PROCESS_RUN = textwrap.dedent("""
    import json, os, sys
    index, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["XLA_FLAGS"] = sys.argv[4]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=index)
    import grain
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxlm.parallel import sharding
    from jaxlm.run.checkpoint import Checkpointer

    def mesh(**sizes):
        return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1, **sizes})

    def iterator():  # each process reads its own slice, as make_pretrain_iterator does
        return iter(grain.MapDataset.range(1000)[index::2].to_iter_dataset())

    full = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    w = jax.make_array_from_callback(full.shape, NamedSharding(mesh(fsdp=8), P("fsdp")),
                                     lambda idx: full[idx])
    it = iterator()
    for _ in range(3 + index):  # the processes are at different positions
        next(it)
    ckpt = Checkpointer(directory, save_every=1, keep_last=2)
    ckpt.save(1, {"w": w}, data_iterator=it, config={"seed": 0}, extra={"process": index})
    expected = [int(next(it)) for _ in range(2)]
    ckpt.wait()
    other = NamedSharding(mesh(data=2, fsdp=2, tensor=2), P(("data", "tensor"), "fsdp"))
    fresh = iterator()
    restored = ckpt.restore(1, {"w": jax.ShapeDtypeStruct(full.shape, np.float32,
                                                          sharding=other)},
                            data_iterator=fresh)
    print(json.dumps({
        "values_ok": all(np.array_equal(s.data, full[s.index])
                         for s in restored["w"].addressable_shards),
        "sharding_ok": restored["w"].sharding == other,
        "expected": expected, "got": [int(next(fresh)) for _ in range(2)],
        "extra": ckpt.read_json(1, "extra"), "latest": ckpt.latest_step()}))
    ckpt.close()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_save_their_shards_and_own_data_positions(tmp_path):
    directory, port = str(tmp_path / "ckpt"), str(_free_port())
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_RUN, str(i), port, directory,
                               xla_flags(4)],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=150)
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    data_files = sorted(os.listdir(os.path.join(directory, "1", "data")))
    assert "process_0-of-2.json" in data_files and "process_1-of-2.json" in data_files
    for index, r in enumerate(results):
        assert r["values_ok"] and r["sharding_ok"], index
        assert r["got"] == r["expected"], index
        assert r["extra"] == {"process": 0}  # JSON items are written once, by process 0
        assert r["latest"] == 1
    assert results[0]["expected"] != results[1]["expected"]


@pytest.mark.slow
@pytest.mark.parametrize("save_shape,restore_shape", [
    ((8, 1, 1, 1), (8, 1, 1, 1)), ((2, 2, 2, 1), (2, 2, 2, 1)),
    ((8, 1, 1, 1), (2, 2, 2, 1)), ((2, 2, 2, 1), (8, 1, 1, 1))])
def test_full_state_round_trip_on_and_across_meshes(tmp_path, save_shape, restore_shape):
    model = Transformer(LLAMA_TINY)
    tx = make_optimizer(base_config().optim, 10)
    names = ("data", "fsdp", "tensor", "pipeline")
    saved, _ = init_sharded_state(model, tx, _mesh(**dict(zip(names, save_shape))),
                                  jax.random.key(3), SEQ_LEN)
    target = state_shardings(model, tx, _mesh(**dict(zip(names, restore_shape))), SEQ_LEN)
    with Checkpointer(str(tmp_path), save_every=1, keep_last=1) as ckpt:
        ckpt.save(1, saved)
        ckpt.wait()
        restored = ckpt.restore(1, _abstract(saved, target))
    _assert_trees_equal(restored, saved)
    for leaf, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert leaf.sharding == sh
