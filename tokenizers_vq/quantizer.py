"""Vector quantiser: nearest-code lookup, straight-through estimator, VQ/commitment/entropy losses, usage.

Follows LlamaGen's `VectorQuantizer` (l2-normalised codebook, squared-distance argmin, the
`codebook_used` ring buffer) so checkpoints and codes match exactly. Usage statistics over a whole
evaluation set are `codebook_stats`; the encoder/decoder around this are in `model.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    """What one quantiser pass returns. Losses are scalars (0 when not requested)."""

    quant: Tensor
    """[B,D,h,w] straight-through quantised latents (gradients flow to the encoder)."""
    codes: Tensor
    """[B,h,w] int64 code indices."""
    vq_loss: Tensor
    """||z_q - sg[z]||^2: moves codes towards encoder outputs."""
    commit_loss: Tensor
    """beta * ||sg[z_q] - z||^2: keeps the encoder near its codes."""
    entropy_loss: Tensor
    """entropy_loss_ratio * (per-sample entropy - batch entropy) of code affinities."""

    @property
    def codebook_loss(self) -> Tensor:
        """Sum of the three quantiser terms, what the generator objective adds."""
        return self.vq_loss + self.commit_loss + self.entropy_loss


def entropy_loss(affinity: Tensor, temperature: float) -> Tensor:
    """Mean per-sample entropy minus the entropy of the mean code distribution (lower = confident, diverse).

    affinity: [N, K] negative distances. Follows LlamaGen's compute_entropy_loss (softmax variant).
    """
    logits = affinity.float() / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    avg_probs = probs.mean(dim=0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(dim=-1).mean()
    return sample_entropy - avg_entropy


def codebook_stats(code_counts: Tensor) -> tuple[float, float]:
    """(usage, perplexity) of a histogram of codes [K]: fraction of codes used, exp(entropy) of the histogram."""
    total = code_counts.sum()
    if total <= 0:
        return 0.0, 0.0
    probs = code_counts.double() / total
    nonzero = probs[probs > 0]
    perplexity = math.exp(float(-(nonzero * nonzero.log()).sum()))
    return float((code_counts > 0).double().mean()), perplexity


class VectorQuantizer(nn.Module):
    """Maps latents [B,D,h,w] to the nearest of `codebook_size` vectors of dimension D."""

    def __init__(self, codebook_size: int, embed_dim: int, beta: float, entropy_loss_ratio: float,
                 l2_norm: bool, entropy_temperature: float = 0.01, usage_window: int = 65536):
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.entropy_loss_ratio = entropy_loss_ratio
        self.entropy_temperature = entropy_temperature
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # LlamaGen's ring buffer of the most recent codes (float, as in their checkpoints); persistent so
        # their files load strictly. `_filled` counts valid entries so unused zeros do not count as code 0.
        self.register_buffer("codebook_used", torch.zeros(usage_window))
        self.register_buffer("_filled", torch.zeros((), dtype=torch.long), persistent=False)

    def codebook(self) -> Tensor:
        """[K, D] the vectors latents are compared with (normalised when `l2_norm`)."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def nearest(self, flat: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
        """(codes [N], distances [N,K]) for latents [N,D]; the expanded square keeps LlamaGen's rounding."""
        distances = (flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)
                     - 2 * flat @ codebook.t())
        return distances.argmin(dim=1), distances

    def forward(self, latents: Tensor, with_losses: bool = True) -> QuantizerOutput:
        b, d, h, w = latents.shape
        z = latents.permute(0, 2, 3, 1).reshape(-1, d)
        codebook = self.codebook()
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        codes, distances = self.nearest(z, codebook)
        z_q = codebook[codes]
        zero = latents.new_zeros(())
        vq_loss = commit_loss = ent_loss = zero
        if with_losses:
            vq_loss = (z_q - z.detach()).pow(2).mean()
            commit_loss = self.beta * (z_q.detach() - z).pow(2).mean()
            if self.entropy_loss_ratio > 0:
                ent_loss = self.entropy_loss_ratio * entropy_loss(-distances, self.entropy_temperature)
        z_q = z + (z_q - z).detach()  # straight-through: forward is the code, backward is identity to z
        quant = z_q.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return QuantizerOutput(quant, codes.reshape(b, h, w), vq_loss, commit_loss, ent_loss)

    def lookup(self, codes: Tensor) -> Tensor:
        """codes [B,h,w] -> quantised latents [B,D,h,w]."""
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got range "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def record_usage(self, codes: Tensor) -> None:
        """Push codes into the ring buffer (the training loop calls this; `forward` stays side-effect free)."""
        flat = codes.reshape(-1).to(self.codebook_used.dtype)
        window = self.codebook_used.numel()
        flat = flat[-window:]
        n = flat.numel()
        self.codebook_used.copy_(torch.cat([self.codebook_used[n:], flat]))
        self._filled.copy_(torch.clamp(self._filled + n, max=window))

    def recent_usage(self) -> float:
        """Fraction of the codebook seen among the recorded recent codes."""
        filled = int(self._filled)
        if filled == 0:
            return 0.0
        recent = self.codebook_used[-filled:].long()
        return float(torch.unique(recent).numel() / self.codebook_size)
