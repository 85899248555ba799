"""jaxlm: a JAX/Flax framework for training language models on TPU and GPU pods."""

import setuptools

setuptools.setup(
    name="jaxlm",
    version="0.1.0",
    description="Readable, reproducible, sharded language-model training in JAX/Flax.",
    packages=setuptools.find_packages(include=["jaxlm", "jaxlm.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "array_record>=0.7",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "chex>=0.1.89",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        "numpy",
        # ml_dtypes 0.7.0 spends ~0.7 s in its import (0.6.0: 5 ms), and JAX imports it in every
        # process: every command and test worker starts that much sooner without it.
        "ml_dtypes>=0.5,<0.7",
        "etils[epath]",
        "pyarrow>=15",
        # MinHash near-duplicate removal before the train/eval split (jaxlm/data/dedup.py).
        "datasketch>=2.0",
        "safetensors>=0.4",  # jaxlm/tools/convert_hf.py (Hugging Face import/export)
        # Quantization: weights (PTQ, QAT, QLoRA; jaxlm/models/quant/) and the int8 KV cache.
        "qwix>=0.1.8",
        # Hugging Face tokenizer.json and its Jinja chat template (jaxlm/data/hf_tokenizer.py).
        "tokenizers>=0.20",
        "jinja2>=3.1",
        # Scaling-law fits (jaxlm/scaling/fit.py) and their plots (jaxlm/tools/fit_scaling_law.py).
        "scipy>=1.11",
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch pinned: this version resolves to a CPU wheel; unpinned pulls GBs of CUDA wheels.
        # jax[tpu] brings libtpu (a ~210 MB wheel) for the TPU ahead-of-time fit-check tests.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6", "torch==2.13.0",
                 "transformers>=5.0", "safetensors>=0.4", "jax[tpu]", "chatterbot-corpus==1.3.3",
                 "pyyaml>=6", "lm-eval>=0.4.5", "accelerate>=0.26", "filelock>=3"],
        # lm-evaluation-harness tasks through `python -m jaxlm.tools.eval` (jaxlm/evaluation/harness.py);
        # accelerate is what the harness's own Hugging Face backend needs, for parity checks.
        "eval": ["lm-eval>=0.4.5", "accelerate>=0.26"],
        # The chatterbot dialogs of configs/sft_tiny.py and configs/dpo_tiny.py (YAML files
        # inside the package; nothing is downloaded at run time).
        "chat": ["chatterbot-corpus==1.3.3", "pyyaml>=6"],
        # gs:// workdirs: orbax writes them natively; metrics.jsonl (etils.epath) and
        # TensorBoard (tensorboardX) need these.
        "gcs": ["gcsfs", "google-cloud-storage"],
        "tpu": ["jax[tpu]", "gcsfs", "google-cloud-storage"],
        "gpu": ["jax[cuda12]"],
        # benchmarks/rl_vs_trl.py: the same GRPO run in TRL's GRPOTrainer on transformers (CPU);
        # 1.16 is the release its settings (use_bias_correction_kl, loss_type) were read from.
        "trl": ["trl>=1.16", "torch==2.13.0", "transformers>=5.0"],
    },
)
