"""Flax Linen models."""

from jaxvla.models.vqgan import VQGAN, make_vqgan, vqgan_variant

__all__ = ["VQGAN", "make_vqgan", "vqgan_variant"]
