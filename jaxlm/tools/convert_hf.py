"""Hugging Face <-> jaxlm checkpoints (Llama 2/3/3.x, Mistral, Qwen2, Gemma 2/3, GPT-2).

    python -m jaxlm.tools.convert_hf import --hf_dir=/models/Llama-2-7b-hf --out_dir=/ckpt/llama2
    python -m jaxlm.main --config=/ckpt/llama2/config.py --workdir=/runs/sft ...

    python -m jaxlm.tools.convert_hf export --checkpoint_dir=/runs/pretrain/checkpoints \
        --out_dir=/models/mine [--step=N] [--dtype=bfloat16]

`import` writes <out_dir>/checkpoints/0 (a params-only jaxlm checkpoint with the run config and
tokenizer reference), <out_dir>/config.py (a run config whose init_from points at it) and a copy
of the tokenizer (tokenizer.json with its config and chat template, or a sentencepiece
tokenizer.model). `export` writes config.json, safetensors that transformers' from_pretrained
loads, and the tokenizer files. Both stream tensor by tensor; see docs/hf.md. --out_dir must be
a new or empty directory outside the input (--overwrite replaces a non-empty one); it appears
only once complete (`jaxlm.weights.write`).
"""


from absl import app, flags

from jaxlm.run import console, errors
from jaxlm.weights.hf import convert as hf

_HF_DIR = flags.DEFINE_string("hf_dir", None, "import: HF model directory (config.json + "
                              "*.safetensors, sharded with model.safetensors.index.json or not).")
_CHECKPOINT_DIR = flags.DEFINE_string("checkpoint_dir", None, "export: a jaxlm checkpoint "
                                      "directory (<workdir>/checkpoints) or a run's workdir.")
_STEP = flags.DEFINE_integer("step", -1, "export: checkpoint step; -1 = the newest.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory (must be empty or absent).")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32",
                                   "import: dtype of the stored jaxlm params.")
_DTYPE = flags.DEFINE_string("dtype", "", "export: dtype of the HF weights (float32, bfloat16, "
                             "float16); '' = the checkpoint's param dtype.")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "export: split the safetensors into files of "
                               "at most this many GiB.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory "
                               "(never the input).")
flags.mark_flag_as_required("out_dir")


def main(argv: list[str]) -> None:
    with console.quiet(None):  # orbax's save and restore lines stay off the console
        errors.run_main(_convert, argv)


def _convert(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in ("import", "export"):
        raise app.UsageError("usage: convert_hf.py import|export --out_dir=... "
                             "(--hf_dir=... | --checkpoint_dir=...)")
    if argv[1] == "import":
        if not _HF_DIR.value:
            raise app.UsageError("import needs --hf_dir")
        hf.import_hf(_HF_DIR.value, _OUT_DIR.value, param_dtype=_PARAM_DTYPE.value,
                     overwrite=_OVERWRITE.value)
        print(f"wrote {_OUT_DIR.value}/{hf.CHECKPOINTS} and {_OUT_DIR.value}/{hf.CONFIG_FILE}")
    else:
        if not _CHECKPOINT_DIR.value:
            raise app.UsageError("export needs --checkpoint_dir")
        files = hf.export_hf(_CHECKPOINT_DIR.value, _OUT_DIR.value,
                             step=None if _STEP.value < 0 else _STEP.value, dtype=_DTYPE.value,
                             max_shard_bytes=int(_SHARD_GB.value * 2**30),
                             overwrite=_OVERWRITE.value)
        print(f"wrote {_OUT_DIR.value}: config.json, {', '.join(files)}")


if __name__ == "__main__":
    app.run(main)
