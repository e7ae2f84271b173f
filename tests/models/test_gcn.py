"""ML-GCN pieces (issue 7): correlation matrix on a hand-made label matrix, normalisation, and the GCN head."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from comic.models.gcn import GCNHead, correlation_matrix, normalized_adjacency

# Classes a, b, c, d (d never observed). Counts a=5, b=4, c=4; co-occurrence ab=2, ac=1, bc=2.
OBSERVED = np.array([
    [1, 1, 0, 0],
    [1, 1, 0, 0],
    [1, 0, 1, 0],
    [1, 0, 0, 0],
    [1, 0, 0, 0],
    [0, 1, 1, 0],
    [0, 1, 1, 0],
    [0, 0, 1, 0],
])


def test_correlation_matrix_by_hand() -> None:
    # P(j|i) = M_ij / N_i:  a: b 2/5 = 0.4 (kept: >= threshold), c 1/5;  b: a 2/4, c 2/4;  c: a 1/4, b 2/4;  d: none.
    # Binary edges a->b, b->a, b->c, c->b; column sums a 1, b 2, c 1, d 0; entries p / column sum, plus identity.
    expected = np.array([
        [1.0, 0.125, 0.0, 0.0],
        [0.25, 1.0, 0.25, 0.0],
        [0.0, 0.125, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ], dtype=np.float32)
    result = correlation_matrix(OBSERVED, threshold=0.4, p=0.25)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, expected)


def test_correlation_threshold_is_inclusive_and_tunable() -> None:
    # Raising the threshold above 0.4 drops the a->b edge (P = 0.4 exactly); column b then sums to 1.
    result = correlation_matrix(OBSERVED, threshold=0.45, p=0.25)
    assert result[0, 1] == 0.0 and result[2, 1] == 0.25


def test_normalized_adjacency_by_hand() -> None:
    # A' = [[1, .25], [0, 1]]: row sums 1.25, 1; A_hat = D A'^T D = [[1/1.25, 0], [.25/sqrt(1.25), 1]].
    result = normalized_adjacency(torch.tensor([[1.0, 0.25], [0.0, 1.0]]))
    expected = torch.tensor([[1 / 1.25, 0.0], [0.25 / math.sqrt(1.25), 1.0]])
    torch.testing.assert_close(result, expected)


def make_head(correlation: np.ndarray, seed: int = 0) -> GCNHead:
    torch.manual_seed(seed)
    embeddings = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    return GCNHead(embeddings, torch.as_tensor(correlation), feature_dim=5, hidden_dim=7)


def test_gcn_head_shapes_and_formula() -> None:
    head = make_head(correlation_matrix(OBSERVED))
    features = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    assert head.classifier().shape == (4, 5)
    logits = head(features)
    assert logits.shape == (3, 4)
    a_hat, h0 = head.adjacency, head.embeddings
    w = a_hat @ torch.nn.functional.leaky_relu(a_hat @ h0 @ head.project_in.weight.T, 0.2) @ head.project_out.weight.T
    torch.testing.assert_close(logits, features @ w.T)
    assert [name for name, _ in head.named_parameters()] == ["project_in.weight", "project_out.weight"]


def test_gcn_head_gradient_reaches_the_projections() -> None:
    head = make_head(correlation_matrix(OBSERVED))
    head(torch.randn(3, 5)).square().sum().backward()
    for weight in (head.project_in.weight, head.project_out.weight):
        assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_gcn_head_uses_the_adjacency() -> None:
    features = torch.randn(3, 5)
    with_edges = make_head(correlation_matrix(OBSERVED))(features)
    self_loops_only = make_head(np.eye(4, dtype=np.float32))(features)  # same seed, same weights
    assert not torch.allclose(with_edges, self_loops_only)


def test_gcn_head_on_glove_embeddings(shared_data: Path) -> None:
    embeddings = torch.from_numpy(np.load(shared_data / "glove_voc20_300d.npy"))
    observed = (np.random.default_rng(0).random((50, 20)) < 0.2).astype(np.uint8)
    head = GCNHead(embeddings, correlation_matrix(observed), feature_dim=16, hidden_dim=32)
    assert head(torch.randn(2, 16)).shape == (2, 20)
