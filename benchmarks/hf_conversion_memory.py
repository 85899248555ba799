"""Peak host memory of jaxlm/tools/convert_hf.py on a ~1.2B-parameter random Llama (3.2-1B shapes).

    python benchmarks/hf_conversion_memory.py --work_dir=/tmp/hf_bench [--dtype=bfloat16]

Writes a random HF directory (config.json + 2 GiB safetensors shards, tensor by tensor, so this
step never holds the model either), then runs `import` and `export` under `/usr/bin/time -v`
and prints a markdown table of the peak RSS of each (with the CPU pressure of the shared machine
just before), next to the model size, the largest HF tensor, the largest group of jaxlm params
the import makes at once and the RSS of a process that only imports the converter's libraries,
then checks the import against its bound (docs/hf.md, "Memory"). The shapes are Llama 3.2
1B's (vocab 128256, d 2048, 16 layers, 32 heads / 8 kv heads, d_ff 8192, tied) without its
llama3 RoPE scaling, which jaxlm does not implement.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm.run.config import model_config  # noqa: E402
from jaxlm.weights.hf import config as hf_config
from jaxlm.weights.hf import convert as hf  # noqa: E402
from jaxlm.weights.hf import safetensors_io
from jaxlm.weights.hf import tensors as hf_weights

_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/hf_bench", "Scratch directory (~3 model sizes).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "dtype of the HF weights and jaxlm params.")

LLAMA_1B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}
# What the import may hold beyond the libraries and two of its largest arrays (a param group or
# HF tensor being filled from the other, or a param and tensorstore's compressed copy of it).
IMPORT_MARGIN_GIB = 0.1
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_random_model(hf_dir: str, dtype: np.dtype) -> tuple[int, int, int, int]:
    """(parameters, bytes, largest tensor bytes, largest jaxlm param group bytes) of the random
    model written to `hf_dir`."""
    os.makedirs(hf_dir)
    cfg = model_config(hf.run_config(hf_config.model_fields(LLAMA_1B), str(dtype)))
    entries = [(m.name, m.shape) for m in hf_weights.tensor_maps(cfg)]
    rng = np.random.default_rng(0)

    def produce(name: str) -> np.ndarray:
        shape = dict(entries)[name]
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    safetensors_io.write_model(hf_dir, entries, produce, dtype, max_shard_bytes=2 * 2**30)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(LLAMA_1B, f, indent=2)
    sizes = [int(np.prod(shape)) for _, shape in entries]
    return (sum(sizes), sum(sizes) * dtype.itemsize, max(sizes) * dtype.itemsize,
            hf.largest_group_bytes(cfg))


def cpu_pressure() -> str:
    """The `some avg60` share of /proc/pressure/cpu: how much of the last minute runnable tasks
    waited for a CPU (the machine is shared)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[2].split("=")[1] + "%"
    except OSError:
        return "n/a"


def peak_rss(args: list[str]) -> tuple[float, float]:
    """(max RSS in GiB, wall seconds) of `python args...` under /usr/bin/time -v."""
    env = dict(os.environ, PYTHONPATH=_REPO, JAX_PLATFORMS="cpu")
    start = time.time()
    out = subprocess.run(["/usr/bin/time", "-v", sys.executable, *args], env=env, check=True,
                         capture_output=True, text=True, cwd=_REPO)
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return kib / 2**20, time.time() - start


def main(argv: list[str]) -> None:
    del argv
    dtype = np.dtype(_DTYPE.value) if _DTYPE.value != "bfloat16" else np.dtype("bfloat16")
    work = _WORK_DIR.value
    shutil.rmtree(work, ignore_errors=True)
    hf_dir, jx_dir, out_dir = (os.path.join(work, d) for d in ("hf", "jaxlm", "hf_export"))
    params, nbytes, largest, group = write_random_model(hf_dir, dtype)
    gib = 2**30
    print(f"random model: {params / 1e9:.3f}B params, {nbytes / gib:.2f} GiB of {dtype}, "
          f"largest HF tensor {largest / gib:.2f} GiB, largest jaxlm param group "
          f"{group / gib:.2f} GiB")
    base, _ = peak_rss(["-c", "import jaxlm.weights.hf.convert, orbax.checkpoint"])
    imp_load = cpu_pressure()
    imp, imp_s = peak_rss(["-m", "jaxlm.tools.convert_hf", "import", f"--hf_dir={hf_dir}",
                           f"--out_dir={jx_dir}", f"--param_dtype={_DTYPE.value}"])
    exp_load = cpu_pressure()
    exp, exp_s = peak_rss(["-m", "jaxlm.tools.convert_hf", "export", f"--checkpoint_dir={jx_dir}",
                           f"--out_dir={out_dir}"])
    print("| step | peak RSS GiB | wall s | CPU pressure avg60 before |\n"
          "| --- | ---: | ---: | ---: |")
    print("| libraries only (python -c 'import jaxlm.weights.hf.convert, orbax') | "
          f"{base:.2f} | | |")
    print(f"| import (HF safetensors -> jaxlm checkpoint) | {imp:.2f} | {imp_s:.0f} | "
          f"{imp_load} |")
    print(f"| export (jaxlm checkpoint -> HF safetensors) | {exp:.2f} | {exp_s:.0f} | "
          f"{exp_load} |")
    bound = base + 2 * max(group, largest) / gib + IMPORT_MARGIN_GIB
    print(f"import bound: libraries + 2 x max(largest group, largest HF tensor) + "
          f"{IMPORT_MARGIN_GIB} = {bound:.2f} GiB: {'met' if imp <= bound else 'EXCEEDED'}; "
          f"output + largest HF tensor + libraries = "
          f"{(nbytes + largest) / gib + base:.2f} GiB")


if __name__ == "__main__":
    app.run(main)
