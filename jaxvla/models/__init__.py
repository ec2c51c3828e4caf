"""Flax Linen models."""

from jaxvla.models.laq import LAQ, laq_size, make_laq
from jaxvla.models.vqgan import VQGAN, make_vqgan, vqgan_variant

__all__ = ["LAQ", "VQGAN", "laq_size", "make_laq", "make_vqgan", "vqgan_variant"]
