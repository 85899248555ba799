"""Greedy decoding throughput of a config's model, with and without the KV cache.

    python benchmarks/decode_throughput.py --config=configs/tiny.py [--new_tokens=128]

Random weights (decoding cost does not depend on their values); prompts of --prompt_len random
tokens; every row generates exactly --new_tokens tokens (no stop token). "cache" is
`jaxlm.inference.Sampler.generate` (prefill + one cached step per token); "recompute" runs the
full forward pass over the whole [B, prompt + new] buffer for every token, the no-cache
baseline. Times include the prefill, not the compile. Prints
markdown table rows for docs/benchmarks.md.
"""

from __future__ import annotations

import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm.inference import Request, Sampler
from jaxlm.models import Transformer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions; the best is reported.")


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


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    cfg = config_lib.model_config(config, config.data.vocab_size)
    p, n = _PROMPT_LEN.value, _NEW.value
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, p), jnp.int32))["params"])
    sampler = Sampler(cfg, params, bucket=8)
    recompute = recompute_decoder(model, p + n)
    rng = np.random.default_rng(0)
    print(f"# {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
          f"{jax.device_count()} device(s); d_model={cfg.d_model} layers={cfg.num_layers} "
          f"vocab={cfg.padded_vocab_size}; prompt {p}, {n} new tokens, greedy")
    print("| batch | decoding | s per batch | tokens/s | speed-up |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for b in map(int, _BATCHES.value):
        prompts = rng.integers(4, cfg.vocab_size, size=(b, p)).astype(np.int32)
        requests = [Request(row.tolist(), n) for row in prompts]
        cached = _best(lambda: sampler.generate(requests), _REPEATS.value)  # noqa: B023
        buffer = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(prompts)
        slow = _best(lambda: jax.block_until_ready(  # noqa: B023
            recompute(params, buffer, jnp.asarray(p))), _REPEATS.value)  # noqa: B023
        for name, t, speedup in (("KV cache", cached, f"{slow / cached:.1f}x"),
                                 ("full recompute", slow, "1.0x")):
            print(f"| {b} | {name} | {t:.3f} | {b * n / t:,.0f} | {speedup} |", flush=True)


if __name__ == "__main__":
    app.run(main)
