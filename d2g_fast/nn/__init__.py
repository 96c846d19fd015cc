"""Neural-network modules (losses and their building blocks)."""
from d2g_fast.nn.augment import PairedAugment
from d2g_fast.nn.elatentlpips import ELatentLPIPS
from d2g_fast.nn.latent_vgg import LatentVGG16BN

__all__ = ["ELatentLPIPS", "LatentVGG16BN", "PairedAugment"]
