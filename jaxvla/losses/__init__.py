"""Pure, jittable losses: ``loss_fn(params, batch, rng) -> (loss, metrics)`` and their parts."""

from jaxvla.losses.laq import laq_loss, make_laq_loss
from jaxvla.losses.tokenizer import make_tokenizer_loss

__all__ = ["laq_loss", "make_laq_loss", "make_tokenizer_loss"]
