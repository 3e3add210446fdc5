"""Losses of the stage-1 autoencoder: L1 + 3D SSIM, adversarial (hinge / least squares),
adaptive adversarial weight, and an optional perceptual term from local feature weights.

Everything here runs in float32 even under bf16/fp16 autocast: SSIM divides small variances
and the adversarial terms square logits, both of which overflow or lose all precision in fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
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


class ReconstructionLoss(nn.Module):
    """``l1_weight * L1 + ssim_weight * (1 - SSIM3D)`` on images in ``[-1, 1]`` (data range 2).

    L1 keeps intensities (HU) right; SSIM keeps edges and texture, which L1 alone blurs.
    MONAI's SSIMLoss with a 3D Gaussian window (11 voxels, sigma 1.5): the SSIM everyone reports.
    """

    def __init__(self, l1_weight: float = 1.0, ssim_weight: float = 0.2) -> None:
        super().__init__()
        self.l1_weight = l1_weight
        self.ssim_weight = ssim_weight
        self.ssim = SSIMLoss(spatial_dims=3, data_range=2.0)

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
