"""Vector quantiser with an EMA codebook, usage monitoring and dead-code restart.

Why EMA rather than a learned codebook: the codebook then receives no gradient, so it cannot be
pushed around by a large adversarial gradient or blow up in fp16; it simply tracks the mean of
the encoder outputs assigned to each code (van den Oord et al. 2017, appendix; Razavi 2019).
Why dead-code restart: 3D encoders collapse onto a few codes early in training; a code whose
EMA usage falls below ``dead_code_threshold`` is moved onto a random encoder output of the
current batch (as in Jukebox, Dhariwal et al. 2020), which revives it at once.

All distance and EMA arithmetic runs in float32 even under bf16/fp16 autocast: nearest-code
search on half-precision distances flips assignments and the EMA sums overflow in fp16.
Under ``torch.distributed`` the usage counts and sums are all-reduced and restarts are broadcast
from rank 0, so every replica keeps the same codebook (DDP needs nothing else).

:class:`GroupedVectorQuantizer` is product quantisation: the latent channels are split into G
groups, each snapped onto its own codebook. A latent voxel then carries ``G * log2(K)`` bits
instead of ``log2(K)`` for the same tensor sizes and nearly the same cost (G searches over
``D/G``-dimensional codes), which is what a small 3D latent needs to reconstruct fine detail:
one 1024-entry codebook for a 4^3 block of voxels is 10 bits per 64 voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class QuantizerOutput:
    """Result of one quantisation.

    Attributes:
        quantized: ``(B, D, x, y, z)`` codebook vectors with a straight-through gradient to the
            encoder output.
        indices: ``(B, x, y, z)`` code index per latent voxel (int64).
        loss: scalar commitment loss ``beta * ||z - sg(q)||^2``.
        perplexity: scalar ``exp(entropy)`` of code usage in this batch (1 = collapse,
            ``num_embeddings`` = uniform use).
        dead_fraction: scalar fraction of codes whose EMA usage is below the restart threshold
            (measured before this step's restart).
        perplexities: ``(G,)`` perplexity of each codebook (``G = 1`` for a single codebook;
            ``perplexity`` is then their mean).

    With G codebooks (:class:`GroupedVectorQuantizer`) ``indices`` is ``(B, G, x, y, z)`` and
    ``loss``/``dead_fraction`` are means over the codebooks.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    dead_fraction: torch.Tensor
    perplexities: torch.Tensor | None = None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser over ``num_embeddings`` vectors of size ``dim``.

    Args:
        num_embeddings: codebook size K.
        dim: vector dimension D (= latent channels).
        commitment_weight: beta in the commitment loss.
        decay: EMA decay of usage counts and sums.
        dead_code_threshold: EMA usage count under which a code is restarted.
        eps: Laplace smoothing of the counts so an unused code never divides by zero.
    """

    def __init__(self, num_embeddings: int, dim: int, commitment_weight: float = 0.25,
                 decay: float = 0.99, dead_code_threshold: float = 0.05, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.dim = dim
        self.commitment_weight = commitment_weight
        self.decay = decay
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps
        embedding = torch.randn(num_embeddings, dim)
        self.register_buffer("embedding", embedding)  # (K, D)
        self.register_buffer("ema_count", torch.ones(num_embeddings))  # (K,)
        self.register_buffer("ema_sum", embedding.clone())  # (K, D)
        # The codebook is initialised from the first training batch (data-dependent init), so
        # codes start where encoder outputs are instead of in an arbitrary Gaussian blob.
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    # -- helpers ---------------------------------------------------------------------------
    def _sample_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` random rows of ``flat`` (with replacement when it has fewer), plus tiny noise
        so that duplicated rows become distinct codes."""
        idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        rows = flat[idx]
        return rows + 1e-3 * rows.std().clamp_min(1e-6) * torch.randn_like(rows)

    def _broadcast_codebook(self) -> None:
        if _distributed():
            for buf in (self.embedding, self.ema_count, self.ema_sum):
                dist.broadcast(buf, src=0)

    @torch.no_grad()
    def _init_codebook(self, flat: torch.Tensor) -> None:
        rows = self._sample_rows(flat, self.num_embeddings)
        self.embedding.copy_(rows)
        self.ema_sum.copy_(rows)
        self.ema_count.fill_(1.0)
        self._broadcast_codebook()
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Update the codebook from this batch; returns the pre-restart dead fraction."""
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.num_embeddings * self.eps) * total
        self.embedding.copy_(self.ema_sum / smoothed[:, None])
        dead = self.ema_count < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead:
            rows = self._sample_rows(flat, n_dead)
            self.embedding[dead] = rows
            # A revived code starts with the usage of one assignment, like a fresh code.
            self.ema_sum[dead] = rows
            self.ema_count[dead] = 1.0
            # Each rank drew its own rows; rank 0's choice wins so replicas stay identical.
            self._broadcast_codebook()
        return dead.float().mean()

    # -- public ----------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z`` of shape ``(B, D, x, y, z)``; updates the codebook in training mode."""
        if z.shape[1] != self.dim:
            raise ValueError(f"expects {self.dim} latent channels, got tensor of shape {tuple(z.shape)}")
        b, _, *spatial = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()
            flat = rearrange(zf, "b d x y z -> (b x y z) d")  # (N, D)
            if self.training and not bool(self.initialised):
                self._init_codebook(flat.detach())
            indices = self._nearest(flat.detach())
            counts = torch.bincount(indices, minlength=self.num_embeddings).float()
            probs = counts / counts.sum().clamp_min(1.0)
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            if self.training:
                dead_fraction = self._ema_update(flat.detach(), indices, counts.clone())
            else:
                dead_fraction = (self.ema_count < self.dead_code_threshold).float().mean()
            q = F.embedding(indices, self.embedding)  # (N, D)
            q = rearrange(q, "(b x y z) d -> b d x y z", b=b, x=spatial[0], y=spatial[1], z=spatial[2])
            loss = self.commitment_weight * F.mse_loss(zf, q.detach())
            # Straight-through estimator: forward uses the code, backward passes to the encoder.
            quantized = zf + (q - zf).detach()
        indices = indices.view(b, *spatial)
        return QuantizerOutput(quantized=quantized, indices=indices, loss=loss,
                               perplexity=perplexity, dead_fraction=dead_fraction,
                               perplexities=perplexity[None])

    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` ``(N, D)`` -> ``(N,)``.

        Processed in chunks of ~4 M distances (16 MB), so quantising a whole-volume latent never
        builds an ``N x K`` matrix and peak memory does not grow with the volume.
        """
        emb = self.embedding
        e2 = emb.pow(2).sum(1)[None]  # (1, K)
        n = flat.shape[0]
        out = torch.empty(n, dtype=torch.long, device=flat.device)
        rows = max(1, (1 << 22) // self.num_embeddings)
        # One reused distance buffer: ||x||^2 is constant per row, so argmin over ||e||^2 - 2 x.e
        # suffices, written in place by addmm (no per-chunk temporaries to fragment the heap).
        buf = flat.new_empty((min(rows, max(n, 1)), self.num_embeddings))
        for start in range(0, n, rows):
            chunk = flat[start:start + rows]
            d = buf[: chunk.shape[0]]
            torch.addmm(e2, chunk, emb.t(), beta=1.0, alpha=-2.0, out=d)
            out[start:start + chunk.shape[0]] = d.argmin(1)
        return out

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for ``indices`` ``(B, x, y, z)`` -> ``(B, D, x, y, z)``."""
        return rearrange(F.embedding(indices, self.embedding), "b x y z d -> b d x y z")


class GroupedVectorQuantizer(nn.Module):
    """Product quantiser: ``num_codebooks`` independent :class:`VectorQuantizer` s, one per
    group of ``dim / num_codebooks`` consecutive latent channels.

    Each codebook has its own EMA, usage monitoring and dead-code restart. The number of
    distinct quantised vectors is ``num_embeddings ** num_codebooks`` while the codebooks hold
    only ``num_codebooks * num_embeddings`` short vectors, so capacity grows without larger
    tensors or a slower search.

    Args:
        num_codebooks: G; must divide ``dim``.
        num_embeddings: K, codes per codebook.
        dim: latent channels D (each codebook quantises ``D / G`` of them).
        commitment_weight, decay, dead_code_threshold, eps: as in :class:`VectorQuantizer`.
    """

    def __init__(self, num_codebooks: int, num_embeddings: int, dim: int, commitment_weight: float = 0.25,
                 decay: float = 0.99, dead_code_threshold: float = 0.05, eps: float = 1e-5) -> None:
        super().__init__()
        if num_codebooks < 1 or dim % num_codebooks:
            raise ValueError(f"expects num_codebooks to divide the latent channels, but got "
                             f"num_codebooks={num_codebooks} and dim={dim}")
        self.num_codebooks = num_codebooks
        self.num_embeddings = num_embeddings
        self.dim = dim
        self.codebooks = nn.ModuleList(
            VectorQuantizer(num_embeddings, dim // num_codebooks, commitment_weight, decay,
                            dead_code_threshold, eps) for _ in range(num_codebooks))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z`` ``(B, D, x, y, z)`` group by group; updates the codebooks in training mode."""
        if z.ndim != 5 or z.shape[1] != self.dim:
            raise ValueError(f"expects {self.dim} latent channels, got tensor of shape {tuple(z.shape)}")
        outs = [vq(zg) for vq, zg in zip(self.codebooks, z.chunk(self.num_codebooks, dim=1))]
        perplexities = torch.stack([o.perplexity for o in outs])  # (G,)
        # Equal group sizes: the mean of the group MSEs is the MSE over all channels.
        return QuantizerOutput(quantized=torch.cat([o.quantized for o in outs], 1),   # (B, D, x, y, z)
                               indices=torch.stack([o.indices for o in outs], 1),     # (B, G, x, y, z)
                               loss=torch.stack([o.loss for o in outs]).mean(),
                               perplexity=perplexities.mean(),
                               dead_fraction=torch.stack([o.dead_fraction for o in outs]).mean(),
                               perplexities=perplexities)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for ``indices`` ``(B, G, x, y, z)`` -> ``(B, D, x, y, z)``."""
        if indices.ndim != 5 or indices.shape[1] != self.num_codebooks:
            raise ValueError(f"expects (B, {self.num_codebooks}, x, y, z) indices, but got shape "
                             f"{tuple(indices.shape)}")
        return torch.cat([vq.lookup(indices[:, g]) for g, vq in enumerate(self.codebooks)], 1)
