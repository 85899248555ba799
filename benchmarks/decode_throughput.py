"""Greedy decoding throughput of a config's model, with and without the KV cache.

    python benchmarks/decode_throughput.py --config=configs/tiny.py [--new_tokens=128]

Random weights (decoding cost does not depend on their values); prompts of --prompt_len random
tokens; every row generates exactly --new_tokens tokens (no stop token). "cache" is
`jaxlm.inference.Sampler.generate` (prefill + one cached step per token); "recompute" runs the
full forward pass over the whole [B, prompt + new] buffer for every token, the no-cache
baseline. Times include the prefill, not the compile. Prints
markdown table rows for docs/benchmarks.md.

The KV cache's dtype (model.kv_cache_dtype), float vs int8, with the bytes each cache holds:

    python benchmarks/decode_throughput.py --config=configs/tiny.py --kv_cache=compute,int8 \
        --recompute=false

Speculative decoding of trained models (their weights decide how many drafts are accepted):

    python benchmarks/decode_throughput.py --target=/tmp/teacher \
        --drafts="distilled=/tmp/student_kd,cross-entropy only=/tmp/student_ce" [--temperature=1]

times plain decoding of the target against `Sampler.speculative` with each draft (workdirs of
runs with the target's tokenizer), on prompts cut from the start of Python stdlib files, and
reports the speed-up and the acceptance rate (accepted / proposed draft tokens).
"""

from __future__ import annotations

import os
import platform
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm.inference import Request, Sampler  # noqa: E402
from jaxlm.models import Transformer, kv_cache  # noqa: E402
from jaxlm.models.kv_cache import with_kv_cache  # noqa: E402
from jaxlm.run import config as config_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions; the best is reported.")
_TARGET = flags.DEFINE_string("target", "", "Speculative mode: the target run's workdir.")
_DRAFTS = flags.DEFINE_list("drafts", [], "Speculative mode: label=workdir of each draft.")
_NUM_DRAFT = flags.DEFINE_integer("num_draft", 4, "Draft tokens proposed per target call.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Speculative mode: 0 = greedy.")
_KV_CACHE = flags.DEFINE_list("kv_cache", ["compute"], "KV-cache dtypes to time: compute (the "
                              "model's compute dtype) and/or int8.")
_RECOMPUTE = flags.DEFINE_bool("recompute", True, "Also time the no-cache baseline; speed-ups "
                               "are against it, else against the first --kv_cache.")
_BUCKET = 8  # the Sampler's length bucket here: prompt and new tokens round up to it


def _stdlib_prompts(count: int) -> list[str]:
    """The first 200 characters of `count` Python stdlib modules (sorted by name)."""
    import os
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))[:count]
    out = []
    for name in names:
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            out.append(f.read(200))
    return out


def speculative_rows() -> None:
    """Plain vs speculative decoding of a trained target with each draft."""
    from jaxlm.inference import SamplingParams
    from jaxlm.weights.restore import restore

    target = restore(_TARGET.value)
    sampler = Sampler(target.model_cfg, target.params, bucket=8, pad_id=target.tokenizer.pad_id)
    sampling = SamplingParams(temperature=_TEMPERATURE.value)
    n = _NEW.value
    print(f"# {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}); "
          f"target d_model={target.model_cfg.d_model} layers={target.model_cfg.num_layers}; "
          f"{n} new tokens, {_NUM_DRAFT.value} drafts per call, temperature "
          f"{_TEMPERATURE.value}")
    print("| batch | decoding | s per batch | tokens/s | speed-up | acceptance |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    drafts = [(spec.split("=", 1)[0], restore(spec.split("=", 1)[1]))
              for spec in _DRAFTS.value]
    for b in map(int, _BATCHES.value):
        requests = [Request(target.tokenizer.encode(text)[:_PROMPT_LEN.value], n)
                    for text in _stdlib_prompts(b)]
        plain = _best(lambda: sampler.generate(requests, sampling), _REPEATS.value)  # noqa: B023
        print(f"| {b} | target alone | {plain:.3f} | {b * n / plain:,.0f} | 1.0x | |",
              flush=True)
        for label, draft in drafts:
            run = lambda d=draft: sampler.speculative(  # noqa: E731
                requests, d.model_cfg, d.params, _NUM_DRAFT.value, sampling)  # noqa: B023
            t = _best(run, _REPEATS.value)
            print(f"| {b} | draft: {label} (d_model={draft.model_cfg.d_model}, "
                  f"{draft.model_cfg.num_layers} layers) | {t:.3f} | {b * n / t:,.0f} | "
                  f"{plain / t:.2f}x | {sampler.last_acceptance_rate:.1%} |", flush=True)


def recompute_decoder(model: nn.Module, total: int):
    """Greedy decoding of a batch by a full forward pass per new token (no cache)."""

    @jax.jit
    def fill(params, buffer_BxT, start):
        def body(pos, buf):
            logits = model.apply({"params": params}, buf)
            nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, pos - 1, 1, False), -1)
            return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(jnp.int32), pos, 1)

        return jax.lax.fori_loop(start, total, body, buffer_BxT)

    return fill


def _best(fn, repeats: int) -> float:
    fn()  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _cache_bytes(sampler: Sampler, batch: int, prompt_len: int, new_tokens: int) -> int:
    """Bytes of k and v (and int8 scales) in the cache `sampler.generate` allocates."""
    length = sum(-(-n // _BUCKET) * _BUCKET for n in (prompt_len, new_tokens))
    return kv_cache.kv_bytes(jax.eval_shape(lambda: sampler.lm.init_cache(batch, length)))


def main(argv: list[str]) -> None:
    del argv
    if _TARGET.value:
        speculative_rows()
        return
    config = _CONFIG.value
    cfg = config_lib.model_config(config, config.data.vocab_size)
    p, n = _PROMPT_LEN.value, _NEW.value
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, p), jnp.int32))["params"])
    samplers = {kind: Sampler(with_kv_cache(cfg, kind), params, bucket=_BUCKET)
                for kind in _KV_CACHE.value}
    recompute = recompute_decoder(model, p + n)
    rng = np.random.default_rng(0)
    print(f"# {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
          f"{jax.device_count()} device(s); d_model={cfg.d_model} layers={cfg.num_layers} "
          f"kv_heads={cfg.num_kv_heads} head_dim={cfg.head_dim} vocab={cfg.padded_vocab_size} "
          f"{cfg.compute_dtype}; prompt {p}, {n} new tokens, greedy")
    print("| batch | decoding | KV-cache MiB | s per batch | tokens/s | speed-up |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for b in map(int, _BATCHES.value):
        prompts = rng.integers(4, cfg.vocab_size, size=(b, p)).astype(np.int32)
        requests = [Request(row.tolist(), n) for row in prompts]
        rows = []
        for kind, sampler in samplers.items():
            t = _best(lambda s=sampler: s.generate(requests), _REPEATS.value)  # noqa: B023
            name = f"KV cache ({'int8' if kind == 'int8' else cfg.compute_dtype})"
            rows.append((name, f"{_cache_bytes(sampler, b, p, n) / 2**20:.2f}", t))
        if _RECOMPUTE.value:
            buffer = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(prompts)
            slow = _best(lambda: jax.block_until_ready(  # noqa: B023
                recompute(params, buffer, jnp.asarray(p))), _REPEATS.value)  # noqa: B023
            rows.append(("full recompute", "", slow))
        base = rows[-1][2] if _RECOMPUTE.value else rows[0][2]
        for name, mib, t in rows:
            print(f"| {b} | {name} | {mib} | {t:.3f} | {b * n / t:,.0f} | {base / t:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    app.run(main)
