"""Inference: KV-cache decoding, sampling filters, beam search, speculative decoding, scoring."""

from jaxlm.inference.processing import SamplingParams
from jaxlm.inference.sampler import Completion, Request, Sampler, shard_params

__all__ = ["Completion", "Request", "Sampler", "SamplingParams", "shard_params"]
