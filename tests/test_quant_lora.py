"""QLoRA: LoRA adapters (float) over a frozen base held quantized (nf4 / int4). The base is
bitwise unchanged by training, only the adapters have optimizer state, no integer leaf reaches
jax.grad or the optimizer's moments, and the loss goes down."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.models import Transformer, lora
from jaxlm.models.quant import quantizer
from jaxlm.models.quant.spec import QuantSpec
from jaxlm.parallel import sharding
from jaxlm.run import config as config_lib
from jaxlm.run.optim import state_bytes, train_only
from jaxlm.run.program import build
from jaxlm.run.train_state import TrainState
from jaxlm.stages.pretrain import pretrain_step
from tests.model_fixtures import LLAMA_TINY, packed_batch

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

QLORA_CFG = dataclasses.replace(LLAMA_TINY, lora_rank=4, lora_alpha=8.0,
                                lora_targets=lora.ATTENTION_TARGETS + lora.MLP_TARGETS,
                                quant=QuantSpec("ptq", "nf4", tile_size=8))


def _base(params):
    return lora.split(params)[0]


@pytest.mark.parametrize("weight", ["nf4", "int4"])
def test_qlora_trains_adapters_only_over_a_frozen_quantized_base(weight):
    cfg = dataclasses.replace(QLORA_CFG, quant=QuantSpec("ptq", weight, tile_size=8))
    model = Transformer(cfg)
    params = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 16), jnp.int32))[
        "params"]))(jax.random.key(0))
    wq = params["blocks"]["attn"]["wq"]
    assert quantizer.is_qarray(wq) and wq.qtype == cfg.quant.qtype
    assert not quantizer.is_qarray(params["blocks"]["attn"]["wq_lora_a"])
    tx = train_only(optax.adam(3e-2), lora.trainable_mask)
    step = jax.jit(functools.partial(pretrain_step, model=model, tx=tx,
                                     lr_schedule=lambda s: 3e-2, freeze=lora.freeze))
    batch = {k: jnp.asarray(v) for k, v in packed_batch(4, 16, cfg.vocab_size).items()}
    state = TrainState.create(params, tx)
    losses = []
    for _ in range(15):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.2, losses
    # the quantized base (values and scales) is bitwise what it was
    jax.tree.map(np.testing.assert_array_equal, _base(params), _base(state.params))
    base_leaves = jax.tree.leaves(_base(params), is_leaf=quantizer.is_qarray)
    assert any(quantizer.is_qarray(x) and x.qvalue.dtype.itemsize == 1 for x in base_leaves)
    # Adam's two float32 moments for each adapter value, nothing for the base
    adapters = lora.split(params)[1]
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    assert state_bytes(tx, params) == pytest.approx(2 * 4 * n_adapter, abs=64)
    moments = [x for x in jax.tree.leaves(state.opt_state) if hasattr(x, "dtype")]
    assert all(jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0 for x in moments)


def _config():
    c = config_lib.base_config()
    c.model.update(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64, num_layers=2,
                   vocab_size=250)
    c.model.lora.rank, c.model.lora.mlp = 4, True
    c.quant.update(mode="ptq", weight="nf4", tile_size=8)
    c.data.seq_len, c.train.global_batch_size, c.train.steps = 16, 4, 3
    c.optim.learning_rate, c.optim.warmup_steps = 3e-2, 0
    c.log.sample_every = 0
    return c


def test_the_program_builds_a_qlora_state_and_steps_it():
    config = _config()
    config_lib.validate(config)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1, "expert": 1},
                              devices=jax.devices()[:1])
    program = build(config, mesh)
    state = program.init_state(jax.random.key(0))
    assert quantizer.is_qarray(state.params["blocks"]["mlp"]["w_in"])
    before = jax.tree.map(np.asarray, state.params)  # the step donates the state
    batch = {k: jnp.asarray(v) for k, v in packed_batch(4, 16, 250).items()}
    with sharding.activate(mesh):
        new, metrics = program.train_step(state, batch)
        new, metrics = program.train_step(new, batch)
    assert np.isfinite(float(metrics["loss"])) and int(new.nonfinite) == 0
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           before, new.params)
    assert not any(jax.tree.leaves(_base(changed)))
    assert all(jax.tree.leaves(lora.split(changed)[1]))


def test_qlora_from_a_float_run_quantizes_its_weights_and_checkpoints_them(tmp_path):
    """init_from a float checkpoint: its weights are read as float and quantized; the QLoRA
    run's checkpoint holds that quantized base, unchanged by training."""
    from jaxlm.run import trainer
    from jaxlm.weights.restore import restore
    from tests.run_fixtures import tiny_run_config

    trainer.run(tiny_run_config(tmp_path, seq_len=16), str(tmp_path / "run"))
    c = tiny_run_config(tmp_path, seq_len=16, steps=3)
    c.init_from.path = str(tmp_path / "run" / "checkpoints")
    c.model.lora.rank, c.model.lora.mlp = 4, True
    c.quant.update(mode="ptq", weight="nf4", tile_size=16)
    trainer.run(c, str(tmp_path / "qlora"))
    qlora = restore(str(tmp_path / "qlora"))
    float_params = restore(str(tmp_path / "run")).params
    want = quantizer.quantize_params(float_params, qlora.model_cfg.quant)
    got = _base(qlora.params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 got, want)
    assert quantizer.is_qarray(got["blocks"]["mlp"]["w_out"])
    # jaxlm/tools/merge_lora.py folds the adapters into the dequantized base: a float model with the
    # QLoRA model's logits
    from jaxlm.tools.merge_lora import merge_checkpoint

    merge_checkpoint(str(tmp_path / "qlora" / "checkpoints"), str(tmp_path / "merged"))
    merged = restore(str(tmp_path / "merged"))
    assert merged.model_cfg.quant.mode == "none" and merged.model_cfg.lora_rank == 0
    assert not any(quantizer.is_qarray(x) for x in jax.tree.leaves(
        merged.params, is_leaf=quantizer.is_qarray))
    tokens = jnp.arange(1, 17, dtype=jnp.int32)[None]
    np.testing.assert_allclose(
        jax.jit(Transformer(merged.model_cfg).apply)({"params": merged.params}, tokens),
        jax.jit(Transformer(qlora.model_cfg).apply)({"params": qlora.params}, tokens),
        rtol=1e-4, atol=1e-4)


def test_qlora_nf4_base_defaults_to_blocks_of_64_inputs():
    """QLoRA quantizes its nf4 base in blocks of 64 inputs (Dettmers et al. 2023), not one
    scale per output channel: left unset, quant.tile_size is 64 for nf4 (0 for int8 / int4),
    and a model whose widths 64 does not divide is told to set the key."""
    c = _config()
    c.quant.tile_size = config_lib.base_config().quant.tile_size  # unset
    c.model.update(d_model=128, head_dim=64, num_heads=2, num_kv_heads=1, d_ff=256)
    config_lib.validate(c)
    assert config_lib.model_config(c).quant.tile_size == 64
    c.quant.weight = "int4"
    assert config_lib.model_config(c).quant.tile_size == 0
    c.quant.weight = "nf4"
    c.model.update(d_model=32, head_dim=8, d_ff=64, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="config key quant.tile_size"):
        config_lib.validate(c)
