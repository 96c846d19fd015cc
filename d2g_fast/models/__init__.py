"""Models built around diffusers networks (imported on first use: they need diffusers)."""
from d2g_fast.models.discriminator import (DiffusionDiscriminator, DiscriminatorConfig,
                                           DiscriminatorOptions, DiscriminatorOutput)
from d2g_fast.models.heads import MultiScaleHeads
from d2g_fast.models.transformer_discriminator import (TransformerDiscriminator,
                                                       TransformerDiscriminatorConfig)

__all__ = ["DiffusionDiscriminator", "DiscriminatorConfig", "DiscriminatorOptions",
           "DiscriminatorOutput", "MultiScaleHeads", "TransformerDiscriminator",
           "TransformerDiscriminatorConfig"]
