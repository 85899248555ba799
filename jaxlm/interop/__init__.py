"""Conversion between jaxlm checkpoints and other formats (Hugging Face: `jaxlm.interop.hf`)."""
