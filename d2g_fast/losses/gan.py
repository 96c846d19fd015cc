"""GAN losses of the conditional diffusion discriminator (paper section 4).

- Non-saturating losses: D minimises E softplus(-D(real)) + E softplus(D(fake)); G minimises
  E softplus(-D(G(z, c))). The softplus, the per-head mean and the sum over heads run inside the
  fused heads op (d2g_fast.ops.multiscale_heads).
- Mix-and-match negatives: a fraction of the fake slots is replaced by REAL latents of other
  samples while the sample's own conditions (noise z, text c) are kept, so D must also judge
  whether x fits (z, c), not only whether x looks real.
- Single-sample lazy R1: every ``r1_interval`` steps, gamma/2 * |grad_x D(x)|^2 on
  ``r1_samples`` (default ONE) real sample(s), multiplied by the interval as in StyleGAN2's lazy
  regularisation so its average strength does not depend on the interval. D(x) is the weighted
  mean logit (``DiffusionDiscriminator.score``). The heads op is differentiated twice here: its
  backward switches to the reference math automatically when a graph of the gradient is built
  (see d2g_fast.ops.multiscale_heads).

Everything works under ``torch.autocast``; the discriminator applies its own bf16 autocast to the
UNet and runs the heads in float32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def generator_loss(discriminator, fake_latent: torch.Tensor, noise: torch.Tensor,
                   encoder_hidden_states: torch.Tensor,
                   added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Non-saturating generator loss E softplus(-D(G(z, c), z, c)). Gradients flow into
    ``fake_latent`` (and D's parameters, which the G optimiser ignores; freeze D with
    ``requires_grad_(False)`` to save their gradients)."""
    return discriminator(fake_latent, noise, encoder_hidden_states, added_cond_kwargs,
                         target=1.0).loss


def mix_and_match(real_latent: torch.Tensor, fake_latent: torch.Tensor, fraction: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace round(fraction * N) fakes by real latents of OTHER samples.

    Returns (negatives, mixed_mask (N,) bool). Sample i that is mixed receives the real latent
    of sample (i + s) mod N for a random shift s in 1..N-1, so it is never its own real.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"mix_and_match: 'fraction' must be in [0, 1], got {fraction}")
    if real_latent.shape != fake_latent.shape:
        raise ValueError(f"mix_and_match: 'real_latent' {tuple(real_latent.shape)} and "
                         f"'fake_latent' {tuple(fake_latent.shape)} must have the same shape")
    n = real_latent.shape[0]
    mask = torch.zeros(n, dtype=torch.bool, device=real_latent.device)
    count = int(round(fraction * n))
    if count == 0 or n < 2:
        return fake_latent, mask
    dev = "cpu" if generator is None else generator.device
    chosen = torch.randperm(n, generator=generator, device=dev)[:count].to(real_latent.device)
    shift = int(torch.randint(1, n, (1,), generator=generator, device=dev))
    mask[chosen] = True
    donors = (torch.arange(n, device=real_latent.device) + shift) % n
    mismatched = real_latent[donors].to(fake_latent.dtype)
    negatives = torch.where(mask.view(-1, 1, 1, 1), mismatched, fake_latent)
    return negatives, mask


@dataclass
class DiscriminatorLossOutput:
    loss: torch.Tensor            # what to backpropagate (GAN loss + R1 on R1 steps)
    gan_loss: torch.Tensor        # E softplus(-D(real)) + E softplus(D(negatives))
    r1_penalty: torch.Tensor | None  # |grad|^2 (mean over R1 samples), None off R1 steps
    real_score: torch.Tensor      # (N,) D(real)
    fake_score: torch.Tensor      # (N,) D(negatives)
    mixed: torch.Tensor           # (N,) bool: which negatives are mismatched reals
    logs: dict = field(default_factory=dict)


@dataclass
class DiscriminatorLoss:
    """The discriminator's loss for one training step.

    ``r1_gamma`` / ``r1_interval`` / ``r1_samples``: lazy single-sample R1 (gamma 0 disables).
    ``mix_fraction``: fraction of negatives that are mismatched real latents (0 disables).
    """

    r1_gamma: float = 1.0
    r1_interval: int = 16
    r1_samples: int = 1
    mix_fraction: float = 0.25

    def __post_init__(self):
        if self.r1_interval < 1:
            raise ValueError(f"DiscriminatorLoss: 'r1_interval' must be >= 1, got {self.r1_interval}")
        if self.r1_samples < 1:
            raise ValueError(f"DiscriminatorLoss: 'r1_samples' must be >= 1, got {self.r1_samples}")
        if self.r1_gamma < 0:
            raise ValueError(f"DiscriminatorLoss: 'r1_gamma' must be >= 0, got {self.r1_gamma}")
        if not 0.0 <= self.mix_fraction <= 1.0:
            raise ValueError(f"DiscriminatorLoss: 'mix_fraction' must be in [0, 1], got "
                             f"{self.mix_fraction}")

    def is_r1_step(self, step: int) -> bool:
        return self.r1_gamma > 0 and step % self.r1_interval == 0

    def __call__(self, discriminator, real_latent: torch.Tensor, fake_latent: torch.Tensor,
                 noise: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict[str, torch.Tensor] | None = None, step: int = 0,
                 generator: torch.Generator | None = None) -> DiscriminatorLossOutput:
        n = real_latent.shape[0]
        real_latent = real_latent.detach()
        negatives, mixed = mix_and_match(real_latent, fake_latent.detach(), self.mix_fraction,
                                         generator)
        # Real and negatives in ONE discriminator call: half the launches, one heads op.
        latents = torch.cat([real_latent, negatives.to(real_latent.dtype)])
        target = torch.cat([torch.ones(n), -torch.ones(n)]).to(real_latent.device)
        out = discriminator(latents, torch.cat([noise, noise]),
                            torch.cat([encoder_hidden_states, encoder_hidden_states]),
                            _repeat_added(added_cond_kwargs), target=target)
        # The op averages over all 2N samples: x2 gives mean_real + mean_fake.
        gan_loss = 2.0 * out.loss
        loss = gan_loss
        penalty = None
        if self.is_r1_step(step):
            penalty = r1_penalty(discriminator, real_latent[:self.r1_samples],
                                 noise[:self.r1_samples],
                                 encoder_hidden_states[:self.r1_samples],
                                 _slice_added(added_cond_kwargs, self.r1_samples))
            loss = loss + 0.5 * self.r1_gamma * self.r1_interval * penalty
        real_score, fake_score = out.score[:n].detach(), out.score[n:].detach()
        logs = {
            "d/gan_loss": gan_loss.detach(),
            "d/real_score": real_score.mean(),
            "d/fake_score": fake_score.mean(),
            "d/acc_real": (real_score > 0).float().mean(),
            "d/acc_fake": (fake_score < 0).float().mean(),
        }
        if penalty is not None:
            logs["d/r1_penalty"] = penalty.detach()
        return DiscriminatorLossOutput(loss=loss, gan_loss=gan_loss, r1_penalty=penalty,
                                       real_score=real_score, fake_score=fake_score,
                                       mixed=mixed, logs=logs)


def r1_penalty(discriminator, real_latent: torch.Tensor, noise: torch.Tensor,
               encoder_hidden_states: torch.Tensor,
               added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """mean over samples of |d D(x) / d x|^2, with a graph so it can be minimised.

    Runs attention with the MATH backend (the flash / memory-efficient kernels have no double
    backward) and without gradient checkpointing (its recomputation would run outside this
    attention setting); both are affordable because R1 sees a single sample."""
    x = real_latent.detach().float().requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]), _no_checkpointing(discriminator):
        score = discriminator.score(x, noise, encoder_hidden_states, added_cond_kwargs)
        (grad,) = torch.autograd.grad(score.float().sum(), x, create_graph=True)
    return grad.float().square().sum(dim=(1, 2, 3)).mean()


@contextlib.contextmanager
def _no_checkpointing(discriminator):
    config = getattr(discriminator, "config", None)
    saved = getattr(config, "gradient_checkpointing", False)
    if config is not None:
        config.gradient_checkpointing = False
    try:
        yield
    finally:
        if config is not None:
            config.gradient_checkpointing = saved


def _repeat_added(added):
    if not added:
        return added
    return {k: torch.cat([v, v]) for k, v in added.items()}


def _slice_added(added, n):
    if not added:
        return added
    return {k: v[:n] for k, v in added.items()}
