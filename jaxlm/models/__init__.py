"""Model definitions: a decoder-only transformer applied as a pure function of its params."""

from jaxlm.models.config import ModelConfig, pad_vocab
from jaxlm.models.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "pad_vocab"]
