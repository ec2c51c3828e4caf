"""Pure, jittable losses: ``loss_fn(params, batch, rng) -> (loss, metrics)`` and their parts."""

from jaxvla.losses.tokenizer import make_tokenizer_loss

__all__ = ["make_tokenizer_loss"]
