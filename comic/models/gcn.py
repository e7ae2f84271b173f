"""ML-GCN (Chen et al., CVPR 2019, "Multi-Label Image Recognition with Graph Convolutional Networks"): the label
correlation matrix, its normalisation, and the GCN head that turns label embeddings into classifier weights.

Follows the reference code, which differs from the paper text: re-weighting
p = 0.25 (paper 0.2), division by column sums, self-loop weight 1 (paper 1 - p). For PLT-MLC the matrix is built
from the *observed* training labels. The label embeddings (GloVe, [C, E]) are read by `load_label_embeddings` (called
by the method builder) and passed to the modules as a tensor; no module reads files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comic.config import ModelConfig, OptimConfig
from comic.models.backbone import FeatureLayer, Trunks, model_param_groups
from comic.models.baseline import BaselineOutput

__all__ = ["GCNHead", "GCNNet", "correlation_matrix", "load_label_embeddings", "normalized_adjacency"]


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
    """Two graph-convolution layers over the C label nodes producing the classifier W [C, D] (ML-GCN, Sec. 3):
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


def load_label_embeddings(spec: str, num_classes: int, seed: int = 0, dim: int = 300) -> Tensor:
    """Label embeddings [C, E] for ML-GCN: a .npy file (rows in the benchmark's class order) or 'random'.

    'random' is a fixed-seed Gaussian stand-in for data without word vectors (the synthetic benchmark); it keeps the
    GCN's graph propagation but carries no word semantics, so report it as a deviation where it is used.
    """
    if spec == "random":
        return torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed))
    if not spec:
        raise ValueError("method ml-gcn needs model.label_embeddings=<path to a [C, E] .npy> "
                         "(e.g. GloVe vectors in class order) or model.label_embeddings=random")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.label_embeddings={spec!r}: no such file")
    vectors = np.load(path)
    if vectors.ndim != 2 or vectors.shape[0] != num_classes:
        raise ValueError(f"model.label_embeddings={spec!r}: shape {vectors.shape}, expected [{num_classes}, E] "
                         "(one row per class, in the benchmark's class order)")
    return torch.as_tensor(vectors, dtype=torch.float32)


class GCNNet(nn.Module):
    """ML-GCN's network: the shared trunk and feature layer, then logits = features @ W^T with W from `GCNHead`.

    Deviation from the reference: the image feature is the feature layer's output (trunk, global average pooling,
    Linear to feat_dim) rather than a global max pooling of the trunk, so every baseline shares one backbone.
    """

    def __init__(self, cfg: ModelConfig, embeddings: Tensor, correlation: np.ndarray, width: int | None = None) -> None:
        super().__init__()
        self.trunks = Trunks(cfg, ("baseline",), width)
        self.features = FeatureLayer(cfg, self.trunks.width)
        self.gcn = GCNHead(embeddings, correlation, cfg.feat_dim)

    def forward(self, inputs: Tensor) -> BaselineOutput:
        """inputs: images [B, 3, H, W] or trunk features [B, width] -> BaselineOutput(logits [B, C])."""
        return BaselineOutput(self.gcn(self.features(self.trunks(inputs)["baseline"])))

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """The trunk's (finetune) and feature layer's groups, and 'baseline/classifier' (the GCN)."""
        return model_param_groups("baseline", self.trunks.trainable("baseline"), self.features, self.gcn, optim)
