"""Acting on a text-to-image model's conditioning: scoring captions with it, and reshaping it
(Chapter 9).

    diffusion_score(pipe, images, conds)   Eq. 9.1: d(x, c) = E_{t, eps} ||eps_theta(z_t, t, c) - eps||^2,
                                           the same (t, eps) draws for every caption (paired estimator)
    sds_loss(pipe, z, cond, gen)           Eq. 9.3: the same error for a "latent image" z that a student
                                           produced, differentiable in z (the UNet stays frozen)
    WindowProjection(d, s)                 CLP (s = 0) / WiCLP: c'_i = W^T [c_{i-s}; ...; c_{i+s}] + b,
                                           initialised at the identity
    SWITCH-OFF                             ``pipe.sample(c, switch=(tau, c_late))``: the projected conditioning
                                           at noisy steps (t >= tau) only

``pipe`` is any ``models.diffusion.Text2Image`` (the zoo's toy model or Stable Diffusion).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadParameter


def predicted_noise(sched, out: torch.Tensor, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The UNet's output as a noise prediction: itself for epsilon models; for v-prediction
    eps = sqrt(abar_t) v + sqrt(1 - abar_t) z_t. The dissertation's errors are in eps."""
    if sched.config.prediction_type == "epsilon":
        return out
    if sched.config.prediction_type != "v_prediction":
        raise BadParameter(f"prediction_type {sched.config.prediction_type!r} is not supported")
    abar = sched.alphas_cumprod.to(zt.device)[t].view(-1, *[1] * (zt.dim() - 1)).to(zt.dtype)
    return abar.sqrt() * out + (1 - abar).sqrt() * zt


def sds_loss(pipe, z: torch.Tensor, cond: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """||eps_theta(z_t, t, c) - eps||^2 averaged over the batch, t ~ U{0..T-1}: z (N, *latent_shape)
    from the student (gradients flow through the frozen UNet into z), cond (N, T, d)."""
    sched = pipe.training_scheduler()
    t = torch.randint(0, sched.config.num_train_timesteps, (len(z),), generator=gen).to(z.device)
    eps = torch.randn(z.shape, generator=gen).to(z)
    zt = sched.add_noise(z, eps, t)
    out = pipe.unet(zt, t, encoder_hidden_states=cond.to(z)).sample
    return F.mse_loss(predicted_noise(sched, out, zt, t), eps)


@torch.no_grad()
def diffusion_score(pipe, images: torch.Tensor, conds: torch.Tensor, n: int = 50, seed: int = 0,
                    batch_size: int = 256) -> torch.Tensor:
    """d (N, C): denoising error of each image (N, 3, H, W) under each conditioning (C, T, d).

    Lower is a better match (Eq. 9.2 picks argmin_c). Timesteps are a stratified grid of ``n``
    points over [0, T) shuffled per image by ``seed``; the noise draws are shared by every
    caption of an image. Errors are in noise space whatever the UNet predicts.
    """
    sched = pipe.training_scheduler()
    x0 = pipe.encode_images(images.to(pipe.device))
    N, C = len(x0), len(conds)
    gen = torch.Generator().manual_seed(seed)
    T = sched.config.num_train_timesteps
    grid = (torch.arange(n) * T) // n + torch.randint(0, max(1, T // n), (n,), generator=gen)
    out = torch.zeros(N, C)
    for i in range(N):
        eps = torch.randn(n, *x0.shape[1:], generator=gen).to(x0)
        t = grid.to(x0.device)
        zt = sched.add_noise(x0[i:i + 1].expand(n, *x0.shape[1:]), eps, t)
        # every caption against the same n draws, all in one batch of C x n rows
        z_all, t_all, eps_all = zt.repeat(C, 1, 1, 1), t.repeat(C), eps.repeat(C, 1, 1, 1)
        cond = conds.to(x0).repeat_interleave(n, dim=0)
        pred = torch.cat([pipe.unet(z_all[k:k + batch_size], t_all[k:k + batch_size],
                                    encoder_hidden_states=cond[k:k + batch_size]).sample
                          for k in range(0, C * n, batch_size)])
        err = (predicted_noise(sched, pred, z_all, t_all) - eps_all) ** 2
        out[i] = err.view(C, -1).mean(1).cpu()
    return out


class WindowProjection(nn.Module):
    """WiCLP: each token's new embedding is a linear map of itself and its ``s`` neighbours on each
    side (zero-padded at the ends); ``s = 0`` is CLP. Starts at the identity (centre block I, others
    0, bias 0), so an untrained projection leaves generation unchanged bit for bit."""

    def __init__(self, d: int, s: int = 1):
        super().__init__()
        if s < 0:
            raise BadParameter(f"window half-width s must be >= 0, got {s}")
        self.s = s
        self.linear = nn.Linear((2 * s + 1) * d, d)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[:, s * d:(s + 1) * d] = torch.eye(d)
            self.linear.bias.zero_()

    def window(self, c: torch.Tensor) -> torch.Tensor:
        """(N, T, d) -> (N, T, (2s + 1) d): token i's neighbours i - s .. i + s, concatenated in order."""
        T = c.shape[1]
        padded = F.pad(c, (0, 0, self.s, self.s))
        return torch.cat([padded[:, k:k + T] for k in range(2 * self.s + 1)], dim=-1)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        if self.s == 0:  # the identity init must be exact: skip the concatenation
            return self.linear(c)
        return self.linear(self.window(c))
