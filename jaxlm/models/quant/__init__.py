"""Weight quantization through qwix: post-training (int8, int4, nf4, int8 dynamic range),
quantization-aware training with fake quantization, and QLoRA's quantized frozen base
(docs/quantization.md)."""
