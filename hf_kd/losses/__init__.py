"""Distillation losses: pure functions of tensors, and the registry that maps config names to them."""

from .fused import fused_cross_entropy, fused_kd_ce, fused_kd_loss
from .kd_ce import (CHUNKED_LOGIT_LOSSES, chunked_forward_kl, chunked_generalized_jsd, chunked_kd_ce,
                    chunked_logit_loss, chunked_logit_mse, chunked_reverse_kl)
from .features import attention_probs_loss, attention_transfer, hint_loss, match_spatial, spatial_attention_map
from .gradients import great_discriminator_loss, great_generator_loss, input_gradient_matching
from .hidden import hidden_cosine, hidden_mse
from .relational import pooled, similarity_preserving
from .logits import (entropy_weighted_kl, forward_kl, generalized_jsd, logit_mse, loss_kwargs, reduce, reverse_kl,
                     skew_forward_kl, skew_reverse_kl, total_variation)

LOGIT_LOSSES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "mse": logit_mse,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": total_variation,
    "entropy_kl": entropy_weighted_kl,
}
HIDDEN_LOSSES = {
    "cosine": hidden_cosine,
    "mse": hidden_mse,
}

__all__ = [
    "forward_kl", "reverse_kl", "generalized_jsd", "logit_mse", "hidden_cosine", "hidden_mse", "reduce",
    "LOGIT_LOSSES", "HIDDEN_LOSSES",
    "chunked_logit_loss", "chunked_forward_kl", "chunked_reverse_kl", "chunked_generalized_jsd", "chunked_logit_mse",
    "CHUNKED_LOGIT_LOSSES", "chunked_kd_ce", "pooled", "similarity_preserving", "fused_kd_loss", "fused_kd_ce", "fused_cross_entropy",
]
__all__ += ["hint_loss", "spatial_attention_map", "match_spatial", "attention_transfer", "attention_probs_loss",
            "input_gradient_matching", "great_discriminator_loss", "great_generator_loss",
            "skew_forward_kl", "skew_reverse_kl", "total_variation", "entropy_weighted_kl", "loss_kwargs"]
