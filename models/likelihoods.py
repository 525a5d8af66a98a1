"""Count likelihoods of the VAE decoder, all evaluated in fp32 (docs/model.md, 'Likelihoods').

Shape legend:
    B   cells                  G   decoded genes (or a chunk of them)
    E   decoder width          V   vocabulary size (tokens 1..V, 0 = PAD)

Every function here leaves autocast (``torch.autocast(enabled=False)``) and upcasts with
``.float()``: lgamma, log-sum-exp and θ lose too much precision in bf16 (docs/model.md,
'Numerics and memory'). REF is the reference implementation (docs/model.md, 'Tags').
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

Likelihood = Literal["nb_shared_theta", "gaussian"]
LIKELIHOODS: tuple[str, ...] = ("nb_shared_theta", "gaussian")
CP10K = 1e4


@contextmanager
def fp32_island(t: Tensor):
    """Disable autocast on ``t``'s device type for the enclosed block."""
    with torch.autocast(device_type=t.device.type, enabled=False):
        yield


class StreamingLogSumExp:
    """Row-wise log-sum-exp accumulated over column chunks (running max and rescaled sum).

    Exact and differentiable: the running max is detached, and LSE(x) = m + log Σ exp(x - m)
    holds for any m, so gradients equal those of ``torch.logsumexp`` over the full row.
    """

    def __init__(self) -> None:
        self.max: Tensor | None = None  # (B,) running max, detached
        self.sum: Tensor | None = None  # (B,) Σ exp(x - max)

    def update(self, x: Tensor) -> None:
        """Fold in a chunk x (B, c)."""
        with fp32_island(x):
            x = x.float()
            cmax = x.detach().amax(dim=-1)  # (B,)
            new = cmax if self.max is None else torch.maximum(self.max, cmax)  # (B,)
            part = torch.exp(x - new[:, None]).sum(dim=-1)  # (B,)
            if self.sum is not None:
                part = part + self.sum * torch.exp(self.max - new)
            self.max, self.sum = new, part

    def result(self) -> Tensor:
        """The (B,) log-sum-exp of everything folded in so far."""
        if self.max is None or self.sum is None:
            raise ValueError("StreamingLogSumExp.result() before any update()")
        return self.max + torch.log(self.sum)


def nb_log_prob(x: Tensor, log_mu: Tensor, log_theta: Tensor) -> Tensor:
    """log NB(x | μ, θ) elementwise, mean μ and inverse dispersion θ, in fp32.

    lgamma(x+θ) − lgamma(θ) − lgamma(x+1) + θ(log θ − log(θ+μ)) + x(log μ − log(θ+μ)),
    with log(θ+μ) = logaddexp(log θ, log μ). Equals scipy ``nbinom(n=θ, p=θ/(θ+μ))``.

    Args:
        x: (...) observed counts.
        log_mu: (...) log means (broadcastable).
        log_theta: (...) log inverse dispersions (broadcastable).

    Returns:
        (...) float32 log-probabilities.
    """
    with fp32_island(x):
        x, log_mu, log_theta = x.float(), log_mu.float(), log_theta.float()
        theta = torch.exp(log_theta)
        log_theta_mu = torch.logaddexp(log_theta, log_mu)
        return (
            torch.lgamma(x + theta)
            - torch.lgamma(theta)
            - torch.lgamma(x + 1.0)
            + theta * (log_theta - log_theta_mu)
            + x * (log_mu - log_theta_mu)
        )


def sample_nb(
    log_mu: Tensor, log_theta: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Gamma-Poisson sample: λ ~ Gamma(shape θ, rate θ/μ), x ~ Poisson(λ), in fp32.

    Args:
        log_mu: (...) log means.
        log_theta: (...) log inverse dispersions (broadcastable).
        generator: optional RNG; the global RNG state is left untouched when given.

    Returns:
        (...) float32 counts.
    """
    with fp32_island(log_mu):
        mu = torch.exp(log_mu.float())
        theta = torch.exp(log_theta.float()).expand_as(mu)
        gamma = torch.distributions.Gamma(theta, theta / mu.clamp_min(1e-30))
        if generator is None:
            lam = gamma.sample()
        else:  # torch's gamma sampler takes no generator: seed a forked RNG from it
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            devices = [mu.device.index or 0] if mu.is_cuda else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                lam = gamma.sample()
        return torch.poisson(lam, generator=generator)


def log1p_cp10k(x: Tensor, library_size: Tensor) -> Tensor:
    """log1p(x / ℓ · 1e4) with ℓ (B,) broadcast over genes; x (B, G) -> (B, G) fp32."""
    with fp32_island(x):
        return torch.log1p(x.float() / library_size.float().clamp_min(1e-12)[:, None] * CP10K)


def gaussian_log_prob(y: Tensor, pred: Tensor) -> Tensor:
    """log N(y | pred, 1) elementwise in fp32 (the ``gaussian`` likelihood on log1p CP10k)."""
    with fp32_island(y):
        return -0.5 * (y.float() - pred.float()) ** 2 - 0.5 * math.log(2 * math.pi)


class Fp32Linear(nn.Linear):
    """Linear computed in fp32 whatever the weights' dtype (bf16 under ZeRO-3 mixed precision).

    The cast happens inside `forward`, so ZeRO-3's per-module fetch hooks gather the weights.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) fp32."""
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(x.float(), self.weight.float(), bias)


class LikelihoodHead(nn.Module):
    """Per-gene output head (REF ``NegativeBinomialTransformerLayer`` names).

    ``params`` is Linear(E -> 1) giving a logit (NB) or the log1p-CP10k prediction (gaussian);
    ``theta`` is Embedding(V + 1, 1) holding φ = log θ, initialised to 1 (NB only).

    Args:
        num_genes: vocabulary size V.
        dim: decoder width E.
        likelihood: ``nb_shared_theta`` or ``gaussian``.
    """

    def __init__(self, num_genes: int, dim: int, likelihood: Likelihood) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; expected {LIKELIHOODS}")
        self.likelihood = likelihood
        self.theta = None
        if likelihood == "nb_shared_theta":
            self.theta = nn.Embedding(num_genes + 1, 1)
            nn.init.ones_(self.theta.weight)
        self.params = Fp32Linear(dim, 1, bias=True)

    def logits(self, h: Tensor) -> Tensor:
        """h (B, G, E) -> (B, G) fp32 (linear in fp32 outside autocast)."""
        with fp32_island(h):
            return self.params(h).squeeze(-1)  # (B, G)

    def log_theta(self, gene_ids: Tensor) -> Tensor:
        """φ for gene_ids (...) -> (...) fp32."""
        if self.theta is None:
            raise ValueError("log_theta needs an NB likelihood")
        return self.theta(gene_ids).squeeze(-1).float()

    def log_prob(
        self, x: Tensor, logits: Tensor, lse: Tensor, library_size: Tensor, gene_ids: Tensor
    ) -> Tensor:
        """Per-entry log-likelihood of a chunk.

        Args:
            x: (B, c) observed counts.
            logits: (B, c) fp32 head outputs for the chunk.
            lse: (B,) log-sum-exp of the logits over all decoded genes (NB only).
            library_size: (B,) ℓ.
            gene_ids: (c,) or (B, c) tokens of the chunk.

        Returns:
            (B, c) fp32.
        """
        if self.theta is None:
            return gaussian_log_prob(log1p_cp10k(x, library_size), logits)
        log_mu = self.log_mu(logits, lse, library_size)  # (B, c)
        return nb_log_prob(x, log_mu, self.log_theta(gene_ids))

    @staticmethod
    def log_mu(logits: Tensor, lse: Tensor, library_size: Tensor) -> Tensor:
        """log μ = logit − LSE + log ℓ; (B, c), (B,), (B,) -> (B, c) fp32."""
        with fp32_island(logits):
            log_l = torch.log(library_size.float().clamp_min(1e-12))  # (B,)
            return logits.float() - (lse.float() - log_l)[:, None]

    def sample(
        self,
        logits: Tensor,
        lse: Tensor | None,
        library_size: Tensor,
        gene_ids: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample a chunk: NB counts, or log1p-CP10k values + N(0, 1) noise (gaussian)."""
        if self.theta is None:
            noise = torch.randn(
                logits.shape, generator=generator, device=logits.device, dtype=torch.float32
            )
            return logits.float() + noise
        log_mu = self.log_mu(logits, lse, library_size)
        return sample_nb(log_mu, self.log_theta(gene_ids), generator)
