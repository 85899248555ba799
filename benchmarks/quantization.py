"""Weight quantization of a trained model: parameter bytes, decode speed and held-out
perplexity for fp32, bf16, int8, int4 (per channel and sub-channel) and int8 dynamic range.

    python -m jaxlm.main --config=configs/tiny.py --workdir=/tmp/jaxlm_tiny   # train first
    python benchmarks/quantization.py --workdir=/tmp/jaxlm_tiny [--out=table.md]

Every variant is the same checkpoint: fp32 as trained; bf16 = params and compute in bfloat16;
the others quantized after loading (`jaxlm.models.quant.convert.quantize_model`, the path of
`--quantize`). Param bytes count int4/nf4 values at half a byte and include the scales; tied
embeddings (configs/tiny.py ties the head to them) stay float. Decode: greedy
`jaxlm.inference.Sampler.generate` of --batch rows x --new_tokens tokens after a --prompt_len
prompt, best of --repeats, compile excluded. Perplexity: the run's own held-out batches
(data split "eval", eval.tokens held-out tokens) through the pretrain stage's eval step
(`jaxlm.run.trainer.evaluate`). "KV bytes" is the KV cache of one row at prompt + new tokens in
the variant's cache dtype: the compute dtype, or int8 with its float32 scales for the "+kv8"
variants (`model.kv_cache_dtype=int8`, `--kv_cache=int8`), counted by `kv_cache.kv_bytes`.
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm.inference import Request, Sampler  # noqa: E402
from jaxlm.models import ModelConfig, Transformer, kv_cache  # noqa: E402
from jaxlm.models.quant import quantizer  # noqa: E402
from jaxlm.models.quant.convert import quantize_model  # noqa: E402
from jaxlm.models.quant.spec import from_preset  # noqa: E402
from jaxlm.parallel import sharding  # noqa: E402
from jaxlm.run import trainer  # noqa: E402
from jaxlm.stages.pretrain import eval_step  # noqa: E402
from jaxlm.weights.restore import restore  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained pretraining run.")
# label -> (--quantize preset or a float dtype, tile size, KV cache dtype)
VARIANTS = {"fp32": ("float32", 0, ""), "bf16": ("bfloat16", 0, ""), "int8": ("int8", 0, ""),
            "int8_dynamic": ("int8_dynamic", 0, ""), "int4": ("int4", 0, ""),
            "int4_t32": ("int4", 32, ""), "nf4_t32": ("nf4", 32, ""),
            "fp32+kv8": ("float32", 0, "int8"), "int8+kv8": ("int8", 0, "int8")}
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Which of " + ", ".join(VARIANTS))
_BATCH = flags.DEFINE_integer("batch", 8, "Rows decoded at once.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Generated tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed decodes; the best is reported.")
_OUT = flags.DEFINE_string("out", "", "Also write the table to this file.")


def variant(model_cfg: ModelConfig, params, name: str) -> tuple[ModelConfig, object]:
    """(model config, params) of variant `name` of a float32 checkpoint."""
    kind, tile, kv_dtype = VARIANTS[name]
    model_cfg = dataclasses.replace(model_cfg, kv_cache_dtype=kv_dtype)
    if kind in ("float32", "bfloat16"):
        cfg = dataclasses.replace(model_cfg, compute_dtype=kind, param_dtype=kind)
        return cfg, jax.tree.map(lambda x: x.astype(kind), params)
    return quantize_model(model_cfg, params, from_preset(kind, tile), None)


def kv_cache_bytes(cfg: ModelConfig, params, tokens: int) -> int:
    """Bytes of one row's KV cache over `tokens` positions (values and any int8 scales)."""
    lm = Sampler(cfg, params).lm
    return kv_cache.kv_bytes(jax.eval_shape(lambda: lm.init_cache(1, tokens)))


def decode_tokens_per_s(cfg: ModelConfig, params, prompt: list[int]) -> float:
    sampler = Sampler(cfg, params)
    requests = [Request(prompt, max_new_tokens=_NEW.value)] * _BATCH.value
    sampler.generate(requests)  # compile
    best = float("inf")
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        sampler.generate(requests)
        best = min(best, time.perf_counter() - t0)
    return _BATCH.value * _NEW.value / best


def main(argv: list[str]) -> None:
    del argv
    workdir = _WORKDIR.value
    loaded = restore(workdir)
    config = loaded.config
    config.data.cache_dir = config.data.cache_dir or os.path.join(workdir, "cache")
    s = trainer.setup(config, workdir)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(1, loaded.model_cfg.vocab_size, _PROMPT_LEN.value)]
    rows = []
    for name in _VARIANTS.value:
        cfg, params = variant(loaded.model_cfg, loaded.params, name)
        jitted = jax.jit(functools.partial(eval_step, model=Transformer(cfg)))
        metrics = trainer.evaluate(
            s, lambda p, b, f=jitted: f(p, sharding.global_batch(b, s.mesh)), params)
        rows.append((name, quantizer.param_bytes(params), kv_cache_bytes(
            cfg, params, _PROMPT_LEN.value + _NEW.value), decode_tokens_per_s(cfg, params, prompt),
            metrics["eval_perplexity"]))
        print(f"{name}: {rows[-1]}", flush=True)
    fp32 = rows[0][1] if rows[0][0] == "fp32" else None
    lines = [f"{loaded.model_cfg.num_layers} layers, d_model {loaded.model_cfg.d_model}, "
             f"step {loaded.step} of {workdir}; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs; decode: batch {_BATCH.value}, {_PROMPT_LEN.value} prompt "
             f"+ {_NEW.value} new tokens; perplexity over {config.eval.tokens} held-out "
             "tokens", "",
             "| variant | param MiB | vs fp32 | KV bytes / row | decode tok/s | held-out ppl |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, nbytes, kv, tps, ppl in rows:
        ratio = f"{nbytes / fp32:.2f}x" if fp32 else "-"
        lines.append(f"| {name} | {nbytes / 2**20:.2f} | {ratio} | {kv} | {tps:.0f} | "
                     f"{ppl:.3f} |")
    table = "\n".join(lines)
    print(table)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
