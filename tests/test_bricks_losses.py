"""The shared losses: NT-Xent (fixtures F1-F2), vox2vec's voxel InfoNCE (F7) and BYOL's regression loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl3d.pretrain.bricks.losses import nt_xent, regression_loss, symmetric_byol_loss, voxel_info_nce

TOL = 1e-5


def test_f1_f2_contrastive():
    torch.manual_seed(0)
    a, b = torch.randn(4, 384), torch.randn(4, 384)
    assert nt_xent(a, b).item() == pytest.approx(1.9760408, abs=TOL)
    assert nt_xent(a[:1], b[:1]).item() == pytest.approx(0.0, abs=TOL)


def _f7_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """F7 recipe (methods.md §10): unit rows, the second view a noisy copy of the first."""
    torch.manual_seed(0)
    e1 = F.normalize(torch.randn(64, 128))
    e2 = F.normalize(e1 + 0.5 * torch.randn(64, 128))
    return e1, e2


def test_f7_voxel_info_nce():
    e1, e2 = _f7_embeddings()
    assert voxel_info_nce(e1, e2).item() == pytest.approx(3.5452111, abs=TOL)


def test_voxel_info_nce_is_the_two_sided_logsumexp_of_the_spec():
    """§4.4: L_1 over [l11, l12] and L_2 over [l21, l22], self-similarities -inf, averaged; NT-Xent on unit rows."""
    e1, e2 = _f7_embeddings()
    tau = 0.1
    l11, l12, l22 = e1 @ e1.T / tau, e1 @ e2.T / tau, e2 @ e2.T / tau
    self_pairs = torch.eye(64, dtype=torch.bool)
    l11, l22 = l11.masked_fill(self_pairs, float("-inf")), l22.masked_fill(self_pairs, float("-inf"))
    first = (-l12.diag() + torch.logsumexp(torch.cat([l11, l12], dim=1), dim=1)).mean()
    second = (-l12.diag() + torch.logsumexp(torch.cat([l12.T, l22], dim=1), dim=1)).mean()
    assert voxel_info_nce(e1, e2).item() == pytest.approx(((first + second) / 2).item(), abs=TOL)
    assert voxel_info_nce(e1, e2, temperature=0.5).item() == pytest.approx(nt_xent(e1, e2).item(), abs=TOL)
    with pytest.raises(ValueError):
        voxel_info_nce(e1, e2[:10])


def test_voxel_info_nce_gradients_are_those_of_the_cross_entropy_over_the_whole_similarity_matrix():
    """The blockwise computation (no 2N x 2N matrix) back-propagates as the plain formulation does."""
    e1, e2 = (e.clone().requires_grad_() for e in _f7_embeddings())
    voxel_info_nce(e1, e2).backward()
    z1, z2 = (e.detach().clone().requires_grad_() for e in (e1, e2))
    z = torch.cat([z1, z2])
    logits = (z @ z.T / 0.1).masked_fill(torch.eye(128, dtype=torch.bool), float("-inf"))
    F.cross_entropy(logits, torch.cat([torch.arange(64, 128), torch.arange(64)])).backward()
    torch.testing.assert_close(e1.grad, z1.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(e2.grad, z2.grad, atol=1e-6, rtol=1e-5)


def test_regression_loss_is_two_minus_two_cos():
    torch.manual_seed(0)
    p, z = torch.randn(8, 32), torch.randn(8, 32)
    torch.testing.assert_close(regression_loss(p, z), 2 - 2 * F.cosine_similarity(p, z, dim=1), atol=1e-6, rtol=0)
    assert regression_loss(p, 3 * p) == pytest.approx(torch.zeros(8), abs=1e-6)
    assert regression_loss(p, -0.5 * p) == pytest.approx(torch.full((8,), 4.0), abs=1e-6)
    maps = torch.randn(2, 16, 3, 3, 3), torch.randn(2, 16, 3, 3, 3)  # voxel-wise, along the channel axis
    torch.testing.assert_close(regression_loss(*maps), 2 - 2 * F.cosine_similarity(*maps, dim=1), atol=1e-6, rtol=0)


def test_symmetric_loss_has_no_gradient_into_targets():
    torch.manual_seed(1)
    p1, z2, p2, z1 = (torch.randn(4, 16, requires_grad=True) for _ in range(4))
    loss = symmetric_byol_loss(p1, z2, p2, z1)
    expected = (2 - 2 * F.cosine_similarity(p1, z2) + 2 - 2 * F.cosine_similarity(p2, z1)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
