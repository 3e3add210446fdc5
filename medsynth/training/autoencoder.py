"""Lightning training of the stage-1 VQ-GAN: manual optimisation of generator and discriminator.

Why manual optimisation: the generator and discriminator step alternately on the same batch,
the discriminator only after its warm-up, and the adaptive adversarial weight needs the
generator graph twice; Lightning's automatic loop would hide all of that. Lightning still owns
devices, precision (bf16/16-mixed/32), DDP, checkpointing and logging.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

from medsynth.errors import ConfigError
from medsynth.models.autoencoder_config import DiscriminatorConfig, VQGANConfig, config_from_dict
from medsynth.models.discriminator import PatchDiscriminator3d
from medsynth.models.vqgan import VQGAN
from medsynth.training.acceleration import (channels_last_input, check_compile_options, compile_in_place,
                                           to_channels_last)
from medsynth.training.losses import (ADV_CRITERIA, PerceptualLoss, ReconstructionLoss,
                                      adaptive_adversarial_weight, discriminator_loss,
                                      generator_adversarial_loss)

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class AutoencoderTrainingConfig:
    """Optimisation and loss settings.

    Attributes:
        max_steps: generator steps (one per batch).
        lr: generator learning rate (Adam).
        lr_discriminator: discriminator learning rate.
        betas: generator Adam betas. (0.9, 0.99) trains the autoencoder much faster than the
            GAN-standard (0.5, 0.9): the generator is a reconstruction model for most of its
            training, and the adversarial term is small. The presets say which they use.
        betas_discriminator: discriminator Adam betas; ``None`` means the same as ``betas``
            (the behaviour of configs written before this field). beta1=0.5 is the GAN-standard
            choice for D (less momentum chasing a moving generator).
        lr_warmup_steps: linear warm-up of both learning rates over this many generator steps
            (0: none). Protects the freshly initialised codebook from large early updates.
        lr_schedule: "constant" or "cosine": the generator lr decays to ``lr_min_ratio * lr``
            at the end of training, which is ``max_steps`` or, when the run has a time budget
            (``--max-time``), whichever of the two comes first (progress is the larger of the
            step and time fractions), so a time-budgeted run on a busy machine still ends at
            the low lr. The discriminator lr stays constant after warm-up.
        lr_min_ratio: final generator lr as a fraction of ``lr`` under the cosine schedule.
        l1_weight, ssim_weight: reconstruction terms.
        adversarial_weight: weight of the generator's adversarial term. With
            ``adaptive_adversarial_weight`` it multiplies the adaptive ratio (taming's
            ``disc_weight``); otherwise it is the fixed weight (0.05 works for 32-128^3 patches).
        adaptive_adversarial_weight: balance the adversarial and reconstruction gradients at
            the decoder's last layer (Esser et al. 2021). Costs two extra backward passes.
        adversarial_start_step: warm-up: no adversarial term (and no discriminator training)
            before this generator step. A discriminator that starts on blurry early
            reconstructions wins at once and its gradient destabilises the codebook.
        adversarial_criterion: "hinge" or "least_squares".
        perceptual_weight: weight of the perceptual term; needs ``perceptual_network``.
        perceptual_network: local TorchScript/torch.export feature network (path).
        perceptual_sha256: required sha256 of that file.
        gradient_clip: max gradient norm for both networks (0 disables).
        val_every_n_steps: validation (reconstruction metrics + figure) interval.
        figure_every_n_steps: slice figure interval (rounded to validations).
        checkpoint_every_n_steps: Lightning checkpoint interval (resume with ``--resume``).
        seed: global seed.
        compile: ``torch.compile`` the VQ-GAN and the discriminator in place (GPU; off in every preset).
        compile_backend, compile_mode: passed to ``torch.compile`` ("inductor", "default").
        channels_last: ``channels_last_3d`` layout for both networks and their inputs (helps
            cuDNN's 3D convolutions under bf16 on GPU; off in every preset).
    """

    max_steps: int = 2000
    lr: float = 2e-4
    lr_discriminator: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)
    betas_discriminator: tuple[float, float] | None = None
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.1
    l1_weight: float = 1.0
    ssim_weight: float = 0.2
    adversarial_weight: float = 0.05
    adaptive_adversarial_weight: bool = False
    adversarial_start_step: int = 1000
    adversarial_criterion: str = "hinge"
    perceptual_weight: float = 0.0
    perceptual_network: str | None = None
    perceptual_sha256: str | None = None
    gradient_clip: float = 1.0
    val_every_n_steps: int = 200
    figure_every_n_steps: int = 200
    checkpoint_every_n_steps: int = 500
    seed: int = 0
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str = "default"
    channels_last: bool = False

    def __post_init__(self) -> None:
        check_compile_options(self.compile, self.compile_backend, self.compile_mode)
        if not isinstance(self.channels_last, bool):
            raise ConfigError(f"expects channels_last to be true or false, but got channels_last={self.channels_last!r}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if self.betas_discriminator is not None:
            self.betas_discriminator = tuple(float(b) for b in self.betas_discriminator)  # type: ignore[assignment]
        if self.adversarial_criterion not in ADV_CRITERIA:
            raise ConfigError(f"expects adversarial_criterion in {ADV_CRITERIA}, but got "
                              f"adversarial_criterion={self.adversarial_criterion!r}")
        for name in ("max_steps", "val_every_n_steps", "figure_every_n_steps", "checkpoint_every_n_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"expects {name} >= 1, but got {name}={getattr(self, name)}")
        for name in ("lr", "lr_discriminator"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"expects {name} > 0, but got {name}={getattr(self, name)}")
        for name in ("l1_weight", "ssim_weight", "adversarial_weight", "perceptual_weight", "gradient_clip"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"expects {name} >= 0, but got {name}={getattr(self, name)}")
        if self.perceptual_weight > 0 and not (self.perceptual_network and self.perceptual_sha256):
            raise ConfigError(f"perceptual_weight={self.perceptual_weight} needs perceptual_network (a local "
                              f"TorchScript file) and its perceptual_sha256; medsynth never downloads weights")
        for name in ("betas", "betas_discriminator"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or not all(0 <= b < 1 for b in value)):
                raise ConfigError(f"expects two {name} in [0, 1), but got {name}={value}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"expects lr_schedule in {LR_SCHEDULES}, but got lr_schedule={self.lr_schedule!r}")
        if int(self.lr_warmup_steps) < 0:
            raise ConfigError(f"expects lr_warmup_steps >= 0, but got lr_warmup_steps={self.lr_warmup_steps}")
        if not 0.0 <= float(self.lr_min_ratio) <= 1.0:
            raise ConfigError(f"expects 0 <= lr_min_ratio <= 1, but got lr_min_ratio={self.lr_min_ratio}")

    def lr_factor(self, step: int, generator: bool = True, time_fraction: float = 0.0) -> float:
        """Multiplier of the base learning rate at generator step ``step`` (warm-up, then the
        schedule; the discriminator only warms up). ``time_fraction``: share of a time budget
        already used (0 without one)."""
        factor = min(1.0, (step + 1) / self.lr_warmup_steps) if self.lr_warmup_steps > 0 else 1.0
        if generator and self.lr_schedule == "cosine":
            progress = min(max(step / max(self.max_steps, 1), time_fraction, 0.0), 1.0)
            factor *= self.lr_min_ratio + (1 - self.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return factor

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "AutoencoderTrainingConfig":
        return config_from_dict(cls, data, "training")


def psnr(recon: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB over the whole batch; ``data_range`` 2 for ``[-1, 1]`` images (= PSNR of the
    same images rescaled to ``[0, 1]``)."""
    mse = (recon.float() - target.float()).pow(2).mean().clamp_min(1e-12)
    return 10 * torch.log10(data_range ** 2 / mse)


class AutoencoderModule(L.LightningModule):
    """VQ-GAN + patch discriminator under Lightning.

    Args:
        model: :class:`VQGANConfig` as a dict.
        discriminator: :class:`DiscriminatorConfig` as a dict.
        training: :class:`AutoencoderTrainingConfig` as a dict.
        metadata: what the model is trained on (recorded in the export).

    Batches are dicts with ``image`` ``(B, 1, X, Y, Z)`` in ``[-1, 1]``.
    """

    def __init__(self, model: dict[str, Any], discriminator: dict[str, Any] | None = None,
                 training: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = VQGANConfig.from_dict(model)
        disc = DiscriminatorConfig.from_dict(discriminator)
        if disc.in_channels != self.model_config.in_channels:
            raise ConfigError(f"expects discriminator in_channels == model in_channels, but got "
                              f"{disc.in_channels} and {self.model_config.in_channels}")
        self.cfg = AutoencoderTrainingConfig.from_dict(training)
        self.metadata = dict(metadata or {})
        self.model = VQGAN(self.model_config)
        self.discriminator = PatchDiscriminator3d(disc)
        self.reconstruction = ReconstructionLoss(self.cfg.l1_weight, self.cfg.ssim_weight)
        self.perceptual: PerceptualLoss | None = None
        if self.cfg.perceptual_weight > 0:
            from medsynth.io.checkpoint import load_feature_network

            self.perceptual = PerceptualLoss(load_feature_network(self.cfg.perceptual_network,
                                                                  self.cfg.perceptual_sha256))
        self.automatic_optimization = False
        # Generator steps taken; a buffer so it is saved in checkpoints and restored on resume.
        self.register_buffer("generator_step", torch.zeros((), dtype=torch.long))
        self.last_validation: dict[str, torch.Tensor] | None = None
        if self.cfg.channels_last:
            to_channels_last(self.model)
            to_channels_last(self.discriminator)
        if self.cfg.compile:
            compile_in_place(self.model, self.cfg.compile_backend, self.cfg.compile_mode)
            compile_in_place(self.discriminator, self.cfg.compile_backend, self.cfg.compile_mode)

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, betas=self.cfg.betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.lr_discriminator,
                                 betas=self.cfg.betas_discriminator or self.cfg.betas)
        return [opt_g, opt_d]

    def _time_fraction(self) -> float:
        """Share of the trainer's time budget (``max_time``) used so far; 0 without one."""
        if self._trainer is None:
            return 0.0
        for cb in self.trainer.callbacks:
            if isinstance(cb, Timer):
                elapsed, remaining = cb.time_elapsed("train"), cb.time_remaining("train")
                if remaining is None:
                    return 0.0
                fraction = elapsed / max(elapsed + remaining, 1e-9)
                # Each rank's clock differs a little; under DDP every replica must use the same
                # lr or the replicas drift apart, so rank 0's value is used everywhere.
                if self.trainer.world_size > 1:
                    fraction = float(self.trainer.strategy.broadcast(fraction, src=0))
                return fraction
        return 0.0

    def _set_learning_rates(self, opt_g, opt_d, step: int) -> None:
        # Set from the step counter (a checkpointed buffer) and the trainer's timer (also
        # checkpointed), so a resumed run continues the schedule.
        time_fraction = self._time_fraction() if self.cfg.lr_schedule == "cosine" else 0.0
        for opt, base, gen in ((opt_g, self.cfg.lr, True), (opt_d, self.cfg.lr_discriminator, False)):
            for group in opt.param_groups:
                group["lr"] = base * self.cfg.lr_factor(step, generator=gen, time_fraction=time_fraction)

    def _clip(self, optimizer) -> None:
        if self.cfg.gradient_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.gradient_clip,
                                gradient_clip_algorithm="norm")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = channels_last_input(batch["image"]) if self.cfg.channels_last else batch["image"]
        opt_g, opt_d = self.optimizers()
        step = int(self.generator_step)
        adversarial = step >= self.cfg.adversarial_start_step and self.cfg.adversarial_weight > 0
        self._set_learning_rates(opt_g, opt_d, step)

        # -- generator --------------------------------------------------------------------------
        recon, q = self.model(x)
        rec = self.reconstruction(recon, x)
        rec_total = rec["total"]
        if self.perceptual is not None:
            perc = self.perceptual(recon, x)
            rec_total = rec_total + self.cfg.perceptual_weight * perc
            self.log("train/perceptual", perc)
        loss_g = rec_total + q.loss
        weight = torch.zeros((), device=x.device)
        if adversarial:
            g_adv = generator_adversarial_loss(self.discriminator(recon), criterion=self.cfg.adversarial_criterion)
            if self.cfg.adaptive_adversarial_weight:
                weight = self.cfg.adversarial_weight * adaptive_adversarial_weight(
                    rec_total, g_adv, self.model.last_decoder_weight)
            else:
                weight = torch.tensor(self.cfg.adversarial_weight, device=x.device)
            loss_g = loss_g + weight * g_adv
            self.log("train/g_adv", g_adv)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        self._clip(opt_g)
        opt_g.step()

        # -- discriminator ----------------------------------------------------------------------
        if adversarial:
            d_loss = discriminator_loss(self.discriminator(x), self.discriminator(recon.detach()),
                                        criterion=self.cfg.adversarial_criterion)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._clip(opt_d)
            opt_d.step()
            self.log("train/d_loss", d_loss)
        opt_d.zero_grad(set_to_none=True)  # D got gradients from the G step: drop them

        self.generator_step += 1
        if int(self.generator_step) >= self.cfg.max_steps:
            self.trainer.should_stop = True
        self.log_dict({"train/loss": loss_g.detach(), "train/l1": rec["l1"], "train/ssim_loss": rec["ssim"],
                       "train/commitment": q.loss, "train/adv_weight": weight,
                       "codebook/perplexity": q.perplexity, "codebook/dead_fraction": q.dead_fraction,
                       "train/psnr": psnr(recon.detach(), x), "train/lr": torch.tensor(opt_g.param_groups[0]["lr"])},
                      prog_bar=False, on_step=True, on_epoch=False, batch_size=x.shape[0])
        if q.perplexities is not None and q.perplexities.numel() > 1:
            # codebook/perplexity is the mean over codebooks; each one is logged too
            self.log_dict({f"codebook/perplexity_{g}": p for g, p in enumerate(q.perplexities)},
                          on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("train/generator_step", self.generator_step.float(), prog_bar=True, on_step=True,
                 batch_size=x.shape[0])
        return loss_g.detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        recon, q = self.model(x)
        recon = recon.float()
        ssim = 1.0 - self.reconstruction.ssim(recon, x.float())
        self.log_dict({"val/psnr": psnr(recon, x), "val/ssim": ssim,
                       "val/mae": (recon - x).abs().mean() / 2.0,  # in [0, 1] window units
                       "val/perplexity": q.perplexity},
                      on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        if batch_idx == 0:
            self.last_validation = {"input": x[:1].detach().float().cpu(), "recon": recon[:1].detach().cpu()}
