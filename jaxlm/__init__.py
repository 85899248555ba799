"""jaxlm: readable, reproducible, sharded language-model training in JAX/Flax."""

__version__ = "0.1.0"
