"""Flax Linen models."""

from jaxvla.models.laq import LAQ, laq_size, make_laq
from jaxvla.models.llama import Llama, LlamaConfig, llama_config
from jaxvla.models.vqgan import VQGAN, make_vqgan, vqgan_variant

__all__ = [
    "LAQ", "Llama", "LlamaConfig", "VQGAN", "laq_size", "llama_config", "make_laq", "make_vqgan", "vqgan_variant",
]
