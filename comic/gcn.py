"""ML-GCN (Chen et al., CVPR 2019, "Multi-Label Image Recognition with Graph Convolutional Networks"): the label
correlation matrix, its normalisation, and the GCN head that turns label embeddings into classifier weights.

Follows the reference code (`reference/baselines.md` §9), which differs from the paper text: re-weighting
p = 0.25 (paper 0.2), division by column sums, self-loop weight 1 (paper 1 - p). For PLT-MLC the matrix is built
from the *observed* training labels. The label embeddings (GloVe, [C, E]) are read by the caller and passed in as a
tensor; nothing here reads files.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GCNHead", "correlation_matrix", "normalized_adjacency"]


def correlation_matrix(observed: np.ndarray, threshold: float = 0.4, p: float = 0.25) -> np.ndarray:
    """Re-weighted binary correlation matrix A' [C, C] (float32) from observed labels [N, C] (0/1).

    The exact rule, with M_ij = #images labelled both i and j (i != j) and N_i = #images labelled i:
      P_ij  = M_ij / N_i                      conditional probability P(j | i); a row with N_i = 0 is all zero
      A_ij  = 1 if P_ij >= threshold else 0   (i != j; A_ii = 0)
      A'_ij = p * A_ij / S_j + [i == j],      S_j = sum_k A_kj (column sum), S_j = 0 leaves column j zero
    The reference divides by S_j + 1e-6; dividing by max(S_j, 1) is the same up to that epsilon and exact on
    hand-checked values. A class with no edge above the threshold keeps only its self-loop.
    """
    labels = (np.asarray(observed) > 0).astype(np.float64)
    if labels.ndim != 2:
        raise ValueError(f"observed must be an [N, C] matrix, got shape {labels.shape}")
    cooccurrence = labels.T @ labels
    counts = np.diag(cooccurrence).copy()
    np.fill_diagonal(cooccurrence, 0)
    conditional = cooccurrence / np.maximum(counts, 1)[:, None]
    binary = (conditional >= threshold).astype(np.float64)
    column_sums = binary.sum(axis=0, keepdims=True)
    reweighted = p * binary / np.maximum(column_sums, 1)
    return (reweighted + np.eye(len(counts))).astype(np.float32)


def normalized_adjacency(correlation: Tensor) -> Tensor:
    """A_hat = D A'^T D with D = diag(rowsum(A'))^(-1/2): [C, C] -> [C, C] (the reference's `gen_adj`).

    Row sums are >= 1 thanks to the self-loops of `correlation_matrix`; a zero row would give inf, so it raises.
    """
    correlation = torch.as_tensor(correlation, dtype=torch.float32)
    row_sums = correlation.sum(dim=1)
    if not bool((row_sums > 0).all()):
        raise ValueError("every row of the correlation matrix needs a positive sum (add self-loops)")
    scale = row_sums.pow(-0.5)
    return scale[:, None] * correlation.T * scale[None, :]


class GCNHead(nn.Module):
    """Two graph-convolution layers over the C label nodes producing the classifier W [C, D] (ML-GCN §3):
      H1 = LeakyReLU_0.2(A_hat H0 W0),  W = A_hat H1 W1,  logits = x W^T
    with H0 = label embeddings [C, E] (fixed input, a buffer), W0: E -> hidden_dim, W1: hidden_dim -> feature_dim,
    no bias (as the reference). feature_dim must equal the backbone's pooled feature size (2048 for ResNet-50/101).

    embeddings: [C, E]; correlation: [C, C] re-weighted matrix from `correlation_matrix` (normalised here once and
    stored as a buffer: it is fixed, the reference recomputes the same value every forward).
    """

    def __init__(self, embeddings: Tensor, correlation: Tensor | np.ndarray, feature_dim: int,
                 hidden_dim: int = 1024, negative_slope: float = 0.2) -> None:
        super().__init__()
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        correlation = torch.as_tensor(correlation, dtype=torch.float32)
        num_classes = embeddings.shape[0]
        if correlation.shape != (num_classes, num_classes):
            raise ValueError(f"correlation must be [{num_classes}, {num_classes}], got {tuple(correlation.shape)}")
        self.register_buffer("embeddings", embeddings.clone())
        self.register_buffer("adjacency", normalized_adjacency(correlation))
        self.project_in = nn.Linear(embeddings.shape[1], hidden_dim, bias=False)
        self.project_out = nn.Linear(hidden_dim, feature_dim, bias=False)
        self.negative_slope = negative_slope
        for layer in (self.project_in, self.project_out):
            # Reference init: uniform(-1/sqrt(out), 1/sqrt(out)), not nn.Linear's fan-in rule.
            bound = 1 / math.sqrt(layer.out_features)
            nn.init.uniform_(layer.weight, -bound, bound)

    def classifier(self) -> Tensor:
        """Classifier weights W: [C, feature_dim]."""
        hidden = F.leaky_relu(self.adjacency @ self.project_in(self.embeddings), self.negative_slope)
        return self.adjacency @ self.project_out(hidden)

    def forward(self, features: Tensor) -> Tensor:
        """features: [B, feature_dim] (global-max-pooled in the reference) -> logits [B, C]."""
        return features @ self.classifier().to(features.dtype).T
