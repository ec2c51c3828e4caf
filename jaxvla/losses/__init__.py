"""Pure, jittable losses: ``loss_fn(params, batch, rng) -> (loss, metrics)`` and their parts."""

from jaxvla.losses.actions import (
    binned_action_loss_from_logits,
    euler_sample,
    flow_matching_loss_from_velocity,
    make_flow_matching_loss,
    sample_flow_times,
)
from jaxvla.losses.finetune import binned_action_loss, flow_matching_loss
from jaxvla.losses.laq import laq_loss, make_laq_loss
from jaxvla.losses.pretrain import pretrain_loss
from jaxvla.losses.tokenizer import make_tokenizer_loss

__all__ = [
    "laq_loss",
    "pretrain_loss",
    "make_laq_loss",
    "make_tokenizer_loss",
    "flow_matching_loss_from_velocity",
    "binned_action_loss_from_logits",
    "make_flow_matching_loss",
    "euler_sample",
    "sample_flow_times",
    "binned_action_loss",
    "flow_matching_loss",
]
