"""Model weights from and to checkpoints: `restore` (the one way to restore a model, its config
and tokenizer from a run's checkpoint, read-only), `write` (params-only checkpoints of the tools
that make one), `init_from` (a run started from another's params), `frozen` (the models a
stage reads but never trains) and `hf` (Hugging Face import and export)."""
