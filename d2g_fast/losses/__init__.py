"""Training losses."""
from d2g_fast.losses.gan import (DiscriminatorLoss, DiscriminatorLossOutput, generator_loss,
                                 mix_and_match, r1_penalty)

__all__ = ["DiscriminatorLoss", "DiscriminatorLossOutput", "generator_loss", "mix_and_match",
           "r1_penalty"]
