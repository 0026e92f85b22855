"""Tests for dlarch_lib.siamese: shared weights, losses against PyTorch, samplers, one-shot episodes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlarch_lib import siamese as sm


def _emb(b: int = 6, d: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed))


def test_embedding_net_shapes_and_unit_norm():
    z = sm.EmbeddingNet(dim=16)(torch.rand(5, 1, 8, 8))
    assert z.shape == (5, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    raw = sm.EmbeddingNet(dim=3, normalize=False)(torch.rand(2, 1, 8, 8))
    assert raw.shape == (2, 3)


def test_embedding_net_errors():
    with pytest.raises(ValueError, match="expects images"):
        sm.EmbeddingNet()(torch.rand(2, 64))
    with pytest.raises(ValueError, match="dim and width"):
        sm.EmbeddingNet(dim=0)


def test_siamese_shares_one_encoder_and_gradients_add_up():
    torch.manual_seed(0)
    net = sm.SiameseNet(sm.EmbeddingNet(dim=8))
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in net.encoder.parameters())
    x = torch.rand(3, 2, 1, 8, 8)
    z = net(x)
    assert z.shape == (3, 2, 8)
    torch.testing.assert_close(z[:, 1], net.encoder(x[:, 1]))
    w = net.encoder.head[-1].weight

    def grad_of(fn) -> torch.Tensor:
        net.zero_grad()
        fn(net(x)).backward()
        return w.grad.clone()

    g1 = grad_of(lambda z: z[:, 0].sum())
    g2 = grad_of(lambda z: z[:, 1].pow(2).sum())
    both = grad_of(lambda z: z[:, 0].sum() + z[:, 1].pow(2).sum())
    torch.testing.assert_close(both, g1 + g2)


def test_siamese_distance_is_symmetric_and_zero_on_self():
    net = sm.SiameseNet(sm.EmbeddingNet())
    a, b = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(net.distance(a, b), net.distance(b, a))
    torch.testing.assert_close(net.distance(a, a), torch.zeros(4))
    with pytest.raises(ValueError, match="same shape"):
        net.distance(a, b[:2])
    with pytest.raises(ValueError, match=r"\(B, K, C, H, W\)"):
        net(a)


def test_triplet_loss_matches_pytorch():
    a, p, n = _emb(8, 5, 0), _emb(8, 5, 1), _emb(8, 5, 2)
    for margin in (0.2, 1.0, 3.0):
        torch.testing.assert_close(
            sm.triplet_loss(a, p, n, margin), nn.TripletMarginLoss(margin=margin)(a, p, n), atol=1e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="share one shape"):
        sm.triplet_loss(a, p, n[:3])
    with pytest.raises(ValueError, match="margin"):
        sm.triplet_loss(a, p, n, margin=0.0)


def test_contrastive_loss_by_hand_and_gradient():
    z1, z2 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.3, 0.4], [0.3, 0.4], [3.0, 4.0]])
    same = torch.tensor([1, 0, 0])
    # d = 0.5, 0.5, 5: pull 0.25, push (1 - 0.5)^2 = 0.25, push 0 (beyond the margin)
    torch.testing.assert_close(
        sm.contrastive_loss(z1, z2, same, margin=1.0), torch.tensor(0.5 * (0.25 + 0.25 + 0.0) / 3)
    )
    z1 = _emb(5, 3).requires_grad_()
    sm.contrastive_loss(z1, torch.zeros(5, 3), torch.ones(5)).backward()
    torch.testing.assert_close(z1.grad, z1.detach() / 5)  # d(d^2/2)/dz1 = z1 - z2, averaged
    with pytest.raises(ValueError, match="same must be"):
        sm.contrastive_loss(z1, z1, torch.ones(4))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        sm.contrastive_loss(torch.zeros(3), torch.zeros(3), torch.ones(3))


def test_batch_hard_triplet_loss_matches_brute_force():
    z, labels = _emb(7, 3), torch.tensor([0, 0, 1, 1, 1, 2, 3])
    dist = torch.cdist(z, z)
    terms = []
    for i in range(7):
        pos = [j for j in range(7) if labels[j] == labels[i] and j != i]
        neg = [j for j in range(7) if labels[j] != labels[i]]
        if pos:
            terms.append(torch.relu(dist[i, pos].max() - dist[i, neg].min() + 0.3))
    torch.testing.assert_close(sm.batch_hard_triplet_loss(z, labels, 0.3), torch.stack(terms).mean())
    with pytest.raises(ValueError, match="two samples of one label"):
        sm.batch_hard_triplet_loss(z[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels must be"):
        sm.batch_hard_triplet_loss(z, labels[:3])


def test_samplers_are_seeded_and_valid():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    i, j, same = sm.sample_pairs(labels, 20, seed=3)
    assert same.sum() == 10 and (i != j).all()
    assert ((labels[i] == labels[j]).long() == same).all()
    torch.testing.assert_close(sm.sample_pairs(labels, 20, seed=3)[1], j)
    a, p, n = sm.sample_triplets(labels, 15, seed=1)
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    with pytest.raises(ValueError, match="at least two samples"):
        sm.sample_pairs(torch.tensor([0, 0, 1]), 4)
    with pytest.raises(ValueError, match="two classes"):
        sm.sample_triplets(torch.tensor([0, 0]), 4)
    with pytest.raises(ValueError, match="n must be"):
        sm.sample_triplets(labels, 0)


def test_one_shot_accuracy_perfect_chance_and_errors():
    labels = torch.arange(5).repeat_interleave(10)
    z = nn.functional.one_hot(labels).float() * 10 + 0.01 * _emb(50, 5)
    acc = sm.one_shot_accuracy(z, labels, n_way=5, episodes=20, queries=3)
    assert acc.shape == (20,) and (acc == 1).all()
    constant = sm.one_shot_accuracy(torch.zeros(50, 2), labels, n_way=5, episodes=20, queries=3)
    torch.testing.assert_close(constant, torch.full((20,), 0.2))  # all ties -> argmin picks way 0
    with pytest.raises(ValueError, match="n_way"):
        sm.one_shot_accuracy(z, labels, n_way=6)
    with pytest.raises(ValueError, match="at least 12 samples"):
        sm.one_shot_accuracy(z, labels, queries=11)


def test_training_steps_match_their_losses():
    torch.manual_seed(0)
    encoder = sm.EmbeddingNet(dim=8, width=2)
    net = sm.SiameseNet(encoder)
    x = torch.rand(6, 3, 1, 8, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    same = torch.tensor([1, 0, 1, 0, 1, 0])
    z = net(x)
    torch.testing.assert_close(sm.contrastive_step(net, (x[:, :2], same)), sm.contrastive_loss(z[:, 0], z[:, 1], same))
    torch.testing.assert_close(sm.triplet_step(net, (x, labels)), sm.triplet_loss(z[:, 0], z[:, 1], z[:, 2]))
    torch.testing.assert_close(
        sm.batch_hard_step(encoder, (x[:, 0], labels)), sm.batch_hard_triplet_loss(encoder(x[:, 0]), labels)
    )
