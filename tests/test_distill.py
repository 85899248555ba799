"""stage=distill: a teacher of another shape restored frozen from its checkpoint, the step on a
sharded mesh equal to one device's, exact resume, a tokenizer mismatch refused, and
distillation after SFT on the SFT batches."""

import shutil
from types import SimpleNamespace

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxlm.parallel import sharding
from jaxlm.run import program as program_lib
from jaxlm.run import trainer
from jaxlm.run.config import base_config
from jaxlm.weights import frozen as frozen_models
from tests.model_fixtures import packed_batch

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

STEPS, STOP = 4, 2


def _config(cache, steps, **model):
    c = base_config()
    c.model.num_layers, c.model.d_model, c.model.d_ff = 1, 32, 64
    c.model.num_heads, c.model.num_kv_heads = 2, 1
    for k, v in model.items():
        c.model[k] = v
    c.data.seq_len, c.data.vocab_size, c.data.max_documents = 16, 400, 60
    c.data.cache_dir = str(cache)
    c.train.global_batch_size, c.train.steps, c.eval.every_steps = 8, steps, STOP
    c.eval.tokens = 8 * c.data.seq_len
    c.optim.warmup_steps, c.optim.learning_rate = 1, 1e-2
    c.log.sample_every, c.log.tensorboard, c.log.every_steps = 0, False, 1
    c.checkpoint.every_steps, c.checkpoint.keep_last, c.checkpoint.async_save = STOP, 4, False
    return c


def _student(base, steps=STEPS):
    c = _config(base / "cache", steps)
    c.stage = "distill"
    c.distill.teacher = str(base / "teacher")  # a workdir: its checkpoints/ is found
    c.distill.alpha = 0.25
    return c


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 2-layer d_model=48 teacher trained for 3 steps; the students are 1-layer d_model=32."""
    base = tmp_path_factory.mktemp("distill")
    c = _config(base / "cache", 3, num_layers=2, d_model=48, d_ff=96)
    c.eval.every_steps = 0
    trainer.run(c, str(base / "teacher"))
    return base


def _state(workdir, step):
    tree = ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))
    return ocp.tree.to_flat_dict(tree, sep="/")


def test_distill_resumes_exactly_and_learns_towards_the_teacher(teacher):
    base = teacher
    reference = base / "student"
    last = trainer.run(_student(base), str(reference))
    assert np.isfinite(last["loss"]) and last["kd"] > 0
    # Stopped after its step-STOP save, then the same command again.
    resumed = base / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    again = trainer.run(_student(base), str(resumed))
    for key in ("loss", "kd", "objective", "grad_norm"):
        assert again[key] == last[key], key
    got, want = _state(resumed, STEPS), _state(reference, STEPS)
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    # Only the student is saved: its params are the 1-layer d_model=32 model's.
    widths = {v.shape[-1] for k, v in want.items() if k.startswith("params/") and "embed" in k}
    assert widths == {32}, widths


def test_sharded_step_equals_one_device(teacher):
    config = _student(teacher)
    s = trainer.setup(config, str(teacher / "setup"))
    batch = packed_batch(8, 16, s.tokenizer.vocab_size, seed=3)
    outs = []
    for mesh_shape in ({"data": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        devices = jax.devices()[:int(np.prod(list(mesh_shape.values())))]
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1,
                                   **mesh_shape}, devices)
        program = program_lib.build(s.config, mesh, vocab_size=s.tokenizer.vocab_size)
        assert program.frozen["teacher"].model_cfg.d_model == 48
        frozen = frozen_models.restore(program.frozen, s.tokenizer)
        state = program.init_state(jax.random.key(0))
        with sharding.activate(mesh):
            state, metrics = program.train_step(state, sharding.global_batch(batch, mesh),
                                                *program.extra_args(None, frozen))
        outs.append(jax.device_get((state.params, metrics)))
    (p1, m1), (p8, m8) = outs
    for key in ("loss", "kd", "grad_norm"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p8, p1)


def test_a_teacher_with_another_tokenizer_is_refused(teacher):
    program = trainer.setup(_student(teacher), str(teacher / "setup2")).program
    other = SimpleNamespace(path="/elsewhere/tokenizer.model", sha256="0" * 64)
    with pytest.raises(ValueError, match="must be the same tokenizer"):
        frozen_models.restore(program.frozen, other)


def test_distill_config_errors_name_the_key(teacher):
    c = _student(teacher)
    c.distill.loss, c.distill.top_k = "jsd", 5
    with pytest.raises(ValueError, match="config key distill.top_k"):
        trainer.setup(c, str(teacher / "bad"))
    c = _student(teacher)
    c.distill.teacher = ""
    with pytest.raises(ValueError, match="config key distill.teacher"):
        trainer.setup(c, str(teacher / "bad"))


def test_distill_after_sft_trains_on_the_sft_batches(tmp_path):
    """distill.data=chat: the student reads exactly the SFT run's batches (same trained-token
    counts, assistant tokens only) from the SFT teacher's tokenizer."""
    import json

    from jaxlm.data import conversations
    from jaxlm.run.config import load_config_file

    dialogs = tmp_path / "dialogs.jsonl"
    dialogs.write_text("".join(json.dumps({"messages": m}) + "\n"
                               for m in conversations.chatterbot_conversations()[:60]))

    def sft_config(**model):
        c = load_config_file("configs/sft_tiny.py", "steps=2")
        c.init_from.path, c.sft.paths = "", str(dialogs)
        c.model.update({"num_layers": 1, "d_model": 32, "d_ff": 64, "num_heads": 2,
                        "num_kv_heads": 1, **model})
        c.data.seq_len, c.data.vocab_size = 32, 400
        c.data.max_documents = 60  # the tokenizer's corpus: not the whole standard library
        c.data.cache_dir = str(tmp_path / "cache")
        c.train.global_batch_size, c.eval.every_steps = 8, 0
        c.log.sample_every, c.log.tensorboard, c.log.every_steps = 0, False, 1
        c.log.peak_flops = 1e11  # no start-up matmul benchmark
        c.checkpoint.async_save = False
        return c

    trainer.run(sft_config(num_layers=2, d_model=48), str(tmp_path / "teacher"))
    student = sft_config()
    student.stage, student.distill.data = "distill", "chat"
    student.distill.teacher = str(tmp_path / "teacher" / "checkpoints")
    trainer.run(student, str(tmp_path / "student"))
    rows = lambda run: [json.loads(line) for line in  # noqa: E731
                        (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                        if "loss" in json.loads(line)]
    teacher_rows, student_rows = rows("teacher"), rows("student")
    assert [r["num_tokens"] for r in student_rows] == [r["num_tokens"] for r in teacher_rows]
    assert all(0 < r["trained_fraction"] < 1 for r in teacher_rows)  # assistant tokens only
    assert all(r["kd"] > 0 for r in student_rows)
