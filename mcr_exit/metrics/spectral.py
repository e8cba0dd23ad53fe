"""Spectral metrics of a representation matrix X (T tokens x d features).

Definitions follow the paper (Sec. 2, Theorem 1, Corollary 2, App. A.2):

* p_j = sigma_j^2 / ||X||_F^2, j = 1..r, with r = min(T, d) singular values.
* matrix-based entropy H(X) = -sum_j p_j log p_j, in nats; normalized: H / log(r).
* anisotropy p_1 = sigma_1^2 / ||X||_F^2.
* Theorem 1: M = ||x_0||^2, R = sum_{i != 0} ||x_i||^2,
  alpha = (1/R) sum_{i != 0} ||x_i||^2 cos^2(theta_i), c = M / R,
  sigma_1^2 >= M + alpha R.
* Corollary 2 with p = (c + alpha) / (c + 1): dominance sigma_1^2 / sum_{j>=2} sigma_j^2 >= (c + alpha) / (1 - alpha),
  p_1 >= p, H <= -p log p - (1 - p) log(1 - p) + (1 - p) log(r - 1).
  The weak form sets alpha = 0 (App. B.1).

Conventions the paper leaves open, chosen here: r is the number of singular values min(T, d)
(not the numerical rank, which would give a tighter but noise-sensitive bound); the eigenvalues
come from the smaller Gram matrix (X X^T or X^T X), which has the same nonzero spectrum as the SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from mcr_exit.metrics.cheb_step import tf32

_EPS = 1e-30


@dataclass(frozen=True, kw_only=True)
class SpectralStats:
    """Per-row spectral statistics; every field is a 1-D tensor over the batch."""

    bos_norm: torch.Tensor
    other_norm: torch.Tensor
    norm_ratio: torch.Tensor
    frob_sq: torch.Tensor
    sigma1_sq: torch.Tensor
    sigma2_sq: torch.Tensor
    sigma3_sq: torch.Tensor
    entropy: torch.Tensor
    entropy_norm: torch.Tensor
    anisotropy: torch.Tensor
    dominance: torch.Tensor
    M: torch.Tensor
    R: torch.Tensor
    alpha: torch.Tensor
    c: torch.Tensor
    sigma1_sq_bound: torch.Tensor
    sigma1_sq_bound_weak: torch.Tensor
    dominance_bound: torch.Tensor
    dominance_bound_weak: torch.Tensor
    anisotropy_bound: torch.Tensor
    anisotropy_bound_weak: torch.Tensor
    entropy_bound: torch.Tensor
    entropy_bound_weak: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _binary_entropy_bound(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """-p log p - (1-p) log(1-p) + (1-p) log(r-1), in nats (Corollary 2, item 3)."""
    q = 1.0 - p
    h = -torch.xlogy(p, p) - torch.xlogy(q, q)
    return h + q * torch.log(torch.clamp(r - 1.0, min=1.0))


def spectral_terms(
    X: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float64,
    gram_dtype: torch.dtype | None = None,
    padded: bool | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """First half of ``spectral_stats``: the cheap per-row terms and the smaller Gram matrix.

    Returns (terms, gram) with gram (B, n, n), n = min(T, d); its eigenvalues are the sigma_j^2.
    Splitting lets a caller run the eigenvalue step elsewhere (another thread, another device).
    ``gram_dtype`` float32 builds the Gram matrix and the terms from float32 copies (sums still in
    ``compute_dtype``); for bfloat16/float16 hidden states on a GPU the products then run on TF32 tensor
    cores, which hold those inputs exactly. ``padded`` False promises that every row is ``T`` long (the
    caller knows it without reading ``lengths`` from the device), which saves masking the Gram matrix.
    """
    if X.dim() == 2:
        X = X.unsqueeze(0)
    if X.dim() != 3:
        raise ValueError(f"X must be (T, d) or (B, T, d), got shape {tuple(X.shape)}")
    B, T, d = X.shape
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=X.device)
    lengths = lengths.to(X.device)
    valid = torch.arange(T, device=X.device)[None, :] < lengths[:, None]  # (B, T)
    work_dtype = gram_dtype or compute_dtype
    if work_dtype == torch.float32 and T <= d and X.is_cuda and X.dtype in (torch.bfloat16, torch.float16):
        return _terms_from_gram(X, lengths, valid, compute_dtype, padded)
    Xc = X.to(work_dtype) * valid[..., None]
    row_sq = (Xc * Xc).sum(-1, dtype=compute_dtype)  # (B, T)
    dots = torch.einsum("btd,bd->bt", Xc[:, 1:], Xc[:, 0]).to(compute_dtype)
    exact_tf32 = Xc.is_cuda and work_dtype == torch.float32 and X.dtype in (torch.bfloat16, torch.float16)
    with tf32(torch.backends.cuda.matmul.allow_tf32 or exact_tf32):
        gram = Xc @ Xc.transpose(1, 2) if T <= d else Xc.transpose(1, 2) @ Xc
    return _terms(row_sq, dots, lengths, d), gram


def _half_gram(X: torch.Tensor) -> torch.Tensor:
    """X X^T in float32 from half-precision X: float32 accumulation of exact products, no float32 copy on GPUs."""
    if X.is_cuda:
        try:
            return torch.bmm(X, X.transpose(1, 2), out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without bmm(out_dtype=...)
            pass
    Xf = X.float()
    return Xf @ Xf.transpose(1, 2)


def _terms_from_gram(X, lengths, valid, compute_dtype, padded=None):
    """GPU path of ``spectral_terms`` for T <= d: one half-precision product with float32 output gives the
    Gram matrix, and the terms are read off it (row norms on its diagonal, <x_i, x_0> in its first row)."""
    B, T, d = X.shape
    gram = _half_gram(X)
    if padded is not False:
        gram.mul_((valid[:, :, None] & valid[:, None, :]).to(gram.dtype))  # padding rows and columns out
    row_sq = gram.diagonal(dim1=-2, dim2=-1).to(compute_dtype)
    return _terms(row_sq, gram[:, 0, 1:].to(compute_dtype), lengths, d), gram


def _terms(row_sq: torch.Tensor, dots: torch.Tensor, lengths: torch.Tensor, d: int) -> dict[str, torch.Tensor]:
    """Theorem 1 terms from squared row norms (B, T) and <x_i, x_0> for i >= 1 (B, T - 1)."""
    M = row_sq[:, 0]
    R = row_sq[:, 1:].sum(-1)
    n_other = (lengths - 1).clamp(min=0).to(row_sq.dtype)
    other_norm = torch.where(
        n_other > 0, row_sq[:, 1:].sqrt().sum(-1) / n_other.clamp(min=1), torch.full_like(M, float("nan"))
    )
    alpha_R = (dots * dots).sum(-1) / M.clamp(min=_EPS)  # alpha R = sum_{i != 0} <x_i, x_0>^2 / ||x_0||^2
    r = lengths.clamp(max=d).to(row_sq.dtype)
    return {"M": M, "R": R, "other_norm": other_norm, "alpha_R": alpha_R, "r": r}


def gram_eigenvalues(gram: torch.Tensor) -> torch.Tensor:
    """sigma_j^2 in descending order, (B, n)."""
    return torch.linalg.eigvalsh(gram).clamp(min=0).flip(-1)


def finish_spectral(terms: dict[str, torch.Tensor], eig) -> SpectralStats:
    """Second half of ``spectral_stats``: everything that needs the spectrum.

    ``eig`` is either all eigenvalues (B, n), descending, or a ``SpectrumSummary`` (total, three largest
    eigenvalues and entropy, from ``mcr_exit.metrics.spectral_estimate``).
    """
    M, R, alpha_R, r = terms["M"], terms["R"], terms["alpha_R"], terms["r"]
    if isinstance(eig, torch.Tensor):
        eig = eig.to(M.device, M.dtype)
        total = eig.sum(-1).clamp(min=_EPS)
        p = eig / total[:, None]
        entropy = -torch.xlogy(p, p).sum(-1)
        top = eig[:, :3]
    else:
        total = eig.total.to(M.device, M.dtype).clamp(min=_EPS)
        entropy = eig.entropy.to(M.device, M.dtype)
        top = eig.top.to(M.device, M.dtype)
    frob_sq = M + R
    bos_norm = M.sqrt()
    other_norm = terms["other_norm"]
    alpha = torch.where(R > 0, alpha_R / R.clamp(min=_EPS), torch.zeros_like(R))
    c = M / R.clamp(min=_EPS)
    log_r = torch.log(r)
    entropy_norm = torch.where(r > 1, entropy / log_r.clamp(min=_EPS), torch.zeros_like(entropy))
    sigma = [top[:, j] if top.shape[1] > j else torch.zeros_like(M) for j in range(3)]
    tail = (frob_sq - sigma[0]).clamp(min=0)
    dominance = sigma[0] / tail.clamp(min=_EPS)
    p_bound = (c + alpha) / (c + 1.0)
    p_weak = c / (c + 1.0)
    one_minus_alpha = 1.0 - alpha
    dominance_bound = torch.where(
        one_minus_alpha > 0, (c + alpha) / one_minus_alpha.clamp(min=_EPS), torch.full_like(c, math.inf)
    )
    return SpectralStats(
        bos_norm=bos_norm,
        other_norm=other_norm,
        norm_ratio=bos_norm / other_norm,
        frob_sq=frob_sq,
        sigma1_sq=sigma[0],
        sigma2_sq=sigma[1],
        sigma3_sq=sigma[2],
        entropy=entropy,
        entropy_norm=entropy_norm,
        anisotropy=sigma[0] / total,
        dominance=dominance,
        M=M,
        R=R,
        alpha=alpha,
        c=c,
        sigma1_sq_bound=M + alpha_R,
        sigma1_sq_bound_weak=M,
        dominance_bound=dominance_bound,
        dominance_bound_weak=c,
        anisotropy_bound=p_bound,
        anisotropy_bound_weak=p_weak,
        entropy_bound=_binary_entropy_bound(p_bound, r),
        entropy_bound_weak=_binary_entropy_bound(p_weak, r),
    )


def spectral_stats(
    X: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> SpectralStats:
    """Spectral statistics of each row of a right-padded batch.

    Args:
        X: (B, T, d) or (T, d) hidden states; rows ``t >= lengths[b]`` are padding and never
            enter a metric. Position 0 of each row is its first real (BOS) token.
        lengths: (B,) number of real tokens per row; defaults to T for every row.
        compute_dtype: dtype of the Gram matrix and its eigenvalues (float64 by default).

    Returns:
        SpectralStats with (B,) tensors on X's device. Entropies in nats.
    """
    terms, gram = spectral_terms(X, lengths, compute_dtype=compute_dtype)
    return finish_spectral(terms, gram_eigenvalues(gram))
