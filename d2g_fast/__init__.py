"""d2g_fast: distil diffusion models into one-step conditional GANs (Diffusion2GAN), fast.

Importing the package loads the compiled kernels (reporting loudly if they are missing) and
registers every op with torch.library; heavy submodules (diffusers models, trainer) load on
first use.
"""
from __future__ import annotations

from d2g_fast import _ext  # noqa: F401  (loads d2g_fast._C first: its TORCH_LIBRARY owns the namespace)
from d2g_fast._build_info import build_info
from d2g_fast import ops  # noqa: F401
from d2g_fast.augment_params import AugmentParams
from d2g_fast.nn.elatentlpips import ELatentLPIPS
from d2g_fast import functional  # noqa: F401
from d2g_fast._version import __version__

__all__ = ["AugmentParams", "ELatentLPIPS", "functional", "build_info", "ops", "__version__"]
