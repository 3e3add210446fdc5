"""Losses of the stage-1 autoencoder: L1 + 3D SSIM, adversarial (hinge / least squares),
adaptive adversarial weight, and an optional perceptual term from local feature weights.

Everything here runs in float32 even under bf16/fp16 autocast: SSIM divides small variances
and the adversarial terms square logits, both of which overflow or lose all precision in fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ADV_CRITERIA = ("hinge", "least_squares")


def _fp32(fn):
    """Run ``fn`` with autocast off and float32 inputs."""
    def wrapped(*tensors: torch.Tensor, **kw):
        device = tensors[0].device.type
        with torch.autocast(device_type=device, enabled=False):
            return fn(*(t.float() for t in tensors), **kw)
    wrapped.__doc__ = fn.__doc__
    return wrapped


class SSIMLoss3d(nn.Module):
    """``1 - SSIM`` of 3D images, equal to MONAI's ``SSIMLoss(spatial_dims=3)`` at a fraction of the cost.

    The same definition as MONAI (Gaussian window of ``kernel_size`` voxels and ``sigma``,
    constants ``k1``, ``k2``, "valid" windows only, mean over channels, voxels and batch); only the
    filtering differs: the Gaussian window is separable, so three 1-D convolutions (3 x 11 taps)
    replace one 11^3 = 1331-tap 3-D convolution. On the tiny preset at 32^3 MONAI's loss took
    about half of each training step on a 2-core CPU; this one is cross-checked against MONAI
    in the tests.
    """

    def __init__(self, data_range: float = 2.0, kernel_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
                 k2: float = 0.03) -> None:
        super().__init__()
        offsets = torch.arange((1 - kernel_size) / 2, (1 + kernel_size) / 2, 1.0)
        gauss = torch.exp(-0.5 * (offsets / sigma) ** 2)
        # not persistent: a constant, kept out of checkpoints (older checkpoints had no buffer here)
        self.register_buffer("window", gauss / gauss.sum(), persistent=False)
        self.c1 = (k1 * data_range) ** 2
        self.c2 = (k2 * data_range) ** 2

    def _filter(self, maps: torch.Tensor) -> torch.Tensor:
        """``(N, 1, X, Y, Z)`` -> Gaussian-weighted local means over valid windows ``(N, 1, X-k+1, ...)``."""
        w = self.window.to(maps)
        for shape in ((1, 1, -1, 1, 1), (1, 1, 1, -1, 1), (1, 1, 1, 1, -1)):
            maps = F.conv3d(maps, w.view(shape))
        return maps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` each (every spatial size >= ``kernel_size``) -> scalar ``1 - SSIM``."""
        if x.shape != y.shape:
            raise ValueError(f"SSIM needs two images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        n = x.shape[0] * x.shape[1]
        spatial = x.shape[2:]
        stacked = torch.cat([x, y, x * x, y * y, x * y]).reshape(5 * n, 1, *spatial)
        mu_x, mu_y, mu_xx, mu_yy, mu_xy = self._filter(stacked).split(n)
        sigma_x, sigma_y, sigma_xy = mu_xx - mu_x * mu_x, mu_yy - mu_y * mu_y, mu_xy - mu_x * mu_y
        ssim = ((2 * mu_x * mu_y + self.c1) / (mu_x * mu_x + mu_y * mu_y + self.c1)) * (
            (2 * sigma_xy + self.c2) / (sigma_x + sigma_y + self.c2))
        return 1.0 - ssim.mean()


class ReconstructionLoss(nn.Module):
    """``l1_weight * L1 + ssim_weight * (1 - SSIM3D)`` on images in ``[-1, 1]`` (data range 2).

    L1 keeps intensities (HU) right; SSIM keeps edges and texture, which L1 alone blurs.
    SSIM with a 3D Gaussian window (11 voxels, sigma 1.5): the SSIM everyone reports, computed as
    MONAI's ``SSIMLoss`` defines it by :class:`SSIMLoss3d`.
    """

    def __init__(self, l1_weight: float = 1.0, ssim_weight: float = 0.2) -> None:
        super().__init__()
        self.l1_weight = l1_weight
        self.ssim_weight = ssim_weight
        self.ssim = SSIMLoss3d(data_range=2.0)

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, C, X, Y, Z)`` each -> {"l1", "ssim" (the loss 1-SSIM), "total"} scalars."""
        with torch.autocast(device_type=recon.device.type, enabled=False):
            recon, target = recon.float(), target.float()
            l1 = (recon - target).abs().mean()
            ssim = self.ssim(recon, target) if self.ssim_weight > 0 else recon.new_zeros(())
        return {"l1": l1, "ssim": ssim, "total": self.l1_weight * l1 + self.ssim_weight * ssim}


@_fp32
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       criterion: str = "hinge") -> torch.Tensor:
    """Discriminator loss on patch logits ``(B, 1, x, y, z)`` of real and reconstructed images."""
    if criterion == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    return 0.5 * ((real_logits - 1.0).pow(2).mean() + fake_logits.pow(2).mean())


@_fp32
def generator_adversarial_loss(fake_logits: torch.Tensor, criterion: str = "hinge") -> torch.Tensor:
    """Generator's adversarial loss on the discriminator's logits for reconstructions."""
    if criterion == "hinge":
        return -fake_logits.mean()
    return (fake_logits - 1.0).pow(2).mean()


def adaptive_adversarial_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor,
                                last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """Balance the adversarial gradient against the reconstruction gradient (Esser et al. 2021).

    Returns ``||d rec / d W|| / (||d adv / d W|| + 1e-4)`` at the decoder's last conv weight ``W``
    (detached), so the adversarial term can never drown the reconstruction term, whatever the
    discriminator's scale.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class PerceptualLoss(nn.Module):
    """LPIPS-style distance in the feature space of a frozen, user-supplied 3D network.

    Features are unit-normalised over channels, squared differences averaged, and summed over
    feature maps. The network comes from :func:`medsynth.io.checkpoint.load_feature_network`
    (a local file with a checked sha256); nothing is downloaded.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "PerceptualLoss":  # the network stays frozen
        super().train(mode)
        self.network.eval()
        return self

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` each -> scalar."""
        feats_r, feats_t = self.network(recon.float()), self.network(target.float())
        if isinstance(feats_r, torch.Tensor):
            feats_r, feats_t = [feats_r], [feats_t]
        total = recon.new_zeros((), dtype=torch.float32)
        for fr, ft in zip(feats_r, feats_t):
            fr = fr / (fr.norm(dim=1, keepdim=True) + 1e-8)
            ft = ft / (ft.norm(dim=1, keepdim=True) + 1e-8)
            total = total + (fr - ft).pow(2).sum(1).mean()
        return total
