"""Model definitions: a decoder-only transformer applied as a pure function of its params."""

from jaxlm.models.config import ModelConfig, MoeConfig, pad_vocab
from jaxlm.models.transformer import Transformer

__all__ = ["ModelConfig", "MoeConfig", "Transformer", "pad_vocab"]
