"""Conversion between jaxlm checkpoints and other formats (Hugging Face:
`jaxlm.weights.hf.convert`)."""
