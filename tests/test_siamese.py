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


def _info_nce_slow(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent by its definition, one view at a time: -log softmax of the positive among the 2N - 1 others."""
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n2, terms = len(z), []
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        sims = torch.stack([z[i] @ z[j] / tau for j in range(n2) if j != i])
        terms.append(-(z[i] @ z[pos] / tau) + torch.logsumexp(sims, dim=0))
    return torch.stack(terms).mean()


def test_info_nce_matches_loop_and_cross_entropy():
    z1, z2 = _emb(5, 4, 0).double(), _emb(5, 4, 1).double()
    for tau in (0.1, 0.5, 2.0):
        loss = sm.info_nce_loss(z1, z2, tau)
        torch.testing.assert_close(loss, _info_nce_slow(z1, z2, tau))
        logits, targets = sm.info_nce_logits(z1, z2, tau)
        assert logits.shape == (10, 10) and torch.isinf(logits.diagonal()).all()
        torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, targets))
        # the same classification built independently: column 0 the positive, then the 2N - 2 negatives
        z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)
        rows = []
        for i in range(10):
            pos = (i + 5) % 10
            rows.append(torch.stack([z[i] @ z[pos]] + [z[i] @ z[j] for j in range(10) if j not in (i, pos)]) / tau)
        ref = nn.functional.cross_entropy(torch.stack(rows), torch.zeros(10, dtype=torch.long))
        torch.testing.assert_close(loss, ref)


def test_info_nce_uniform_logits_give_log_of_candidates_and_errors():
    same = torch.ones(4, 3)  # every view identical: a uniform softmax over 2N - 1 = 7 candidates
    torch.testing.assert_close(sm.info_nce_loss(same, same, 0.3), torch.log(torch.tensor(7.0)))
    z = _emb(4, 3)  # perfectly aligned views and a low temperature: the loss falls toward 0
    assert sm.info_nce_loss(z, z, 0.01) < sm.info_nce_loss(z, z, 1.0)
    with pytest.raises(ValueError, match="share one shape"):
        sm.info_nce_loss(z, z[:3])
    with pytest.raises(ValueError, match="N >= 2"):
        sm.info_nce_loss(z[:1], z[:1])
    with pytest.raises(ValueError, match="temperature"):
        sm.info_nce_logits(z, z, 0.0)


def test_augment_digits_identity_reproducible_and_errors():
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    same = sm.augment_digits(x, torch.Generator().manual_seed(1), max_shift=0, max_degrees=0, noise=0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)  # no rotation, shift or noise: the image itself
    v1 = sm.augment_digits(x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(v1, sm.augment_digits(x, torch.Generator().manual_seed(2)))
    assert v1.shape == x.shape and not torch.allclose(v1, x, atol=0.05)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        sm.augment_digits(x[:, 0], torch.Generator())
    with pytest.raises(ValueError, match=">= 0"):
        sm.augment_digits(x, torch.Generator(), noise=-1.0)


def test_projection_net_and_simclr_step():
    torch.manual_seed(0)
    encoder = sm.EmbeddingNet(dim=8, width=2)
    model = sm.ProjectionNet(encoder, 8, dim_out=5, hidden=7)
    x = torch.rand(6, 1, 8, 8)
    assert model(x).shape == (6, 5)
    step = sm.make_simclr_step(torch.Generator().manual_seed(0), temperature=0.5)
    loss = step(model, (x, torch.zeros(6)))
    assert loss.ndim == 0 and 0 < loss < float(torch.log(torch.tensor(11.0))) + 2 / 0.5
    loss.backward()
    assert encoder.head[-1].weight.grad.abs().sum() > 0  # the encoder learns through the projection head
    with pytest.raises(ValueError, match="dim_in"):
        sm.ProjectionNet(encoder, 0)
    with pytest.raises(ValueError, match="temperature"):
        sm.make_simclr_step(torch.Generator(), temperature=-1.0)


def test_semi_hard_triplets_on_a_hand_made_batch():
    z = torch.tensor([[0.0], [0.1], [0.25], [1.0], [0.28]])  # 1-D points: distances are easy to read
    labels = torch.tensor([0, 0, 1, 1, 2])
    a, p, n = sm.semi_hard_triplets(z, labels, margin=0.2)
    # (0, 1): d_ap = 0.1; negatives at 0.25 and 0.28 are semi-hard, 1.0 is easy -> the nearer, 2
    # (1, 0): d_ap = 0.1; negatives at 0.15 and 0.18 are semi-hard -> 2
    # (2, 3): d_ap = 0.75; every negative is nearer than the positive (hard) -> no semi-hard one, left out
    # (3, 2): d_ap = 0.75; 0.9 is semi-hard, 1.0 and 0.72 are not -> 1
    assert list(zip(a.tolist(), p.tolist(), n.tolist())) == [(0, 1, 2), (1, 0, 2), (3, 2, 1)]
    expected = sm.triplet_loss(z[a], z[p], z[n], margin=0.2)
    torch.testing.assert_close(sm.semi_hard_triplet_loss(z, labels, margin=0.2), expected)
    far = torch.tensor([[0.0], [0.1], [5.0], [5.1]])  # all negatives beyond the margin: no triplet, zero loss
    zero = sm.semi_hard_triplet_loss(far.requires_grad_(), torch.tensor([0, 0, 1, 1]))
    assert zero == 0 and zero.requires_grad
    with pytest.raises(ValueError, match="labels must be"):
        sm.semi_hard_triplets(z, labels[:2])
    with pytest.raises(ValueError, match="margin"):
        sm.semi_hard_triplets(z, labels, margin=0.0)


def test_semi_hard_triplets_match_brute_force():
    z, labels = _emb(12, 3, 5), torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(0))
    dist = torch.cdist(z, z)
    expected = []
    for i in range(12):
        for j in range(12):
            if i != j and labels[i] == labels[j]:
                cand = [k for k in range(12) if labels[k] != labels[i] and dist[i, j] < dist[i, k] < dist[i, j] + 0.5]
                if cand:
                    expected.append((i, j, min(cand, key=lambda k: dist[i, k].item())))
    a, p, n = sm.semi_hard_triplets(z, labels, margin=0.5)
    assert expected and list(zip(a.tolist(), p.tolist(), n.tolist())) == expected


def test_equal_error_rate_by_hand_and_errors():
    assert sm.equal_error_rate(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.0, 0.5, 1.0])) == 0.5  # chance
    assert sm.equal_error_rate(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])) == 0.0  # perfect
    # the crossing lies between the 2nd and 3rd points: t = 0.2 / 0.7 of the way, FPR = FNR = 0.22 / 0.7
    eer = sm.equal_error_rate(torch.tensor([0.0, 0.2, 0.6, 1.0]), torch.tensor([0.0, 0.6, 0.9, 1.0]))
    assert abs(eer - 0.22 / 0.7) < 1e-6
    with pytest.raises(ValueError, match="non-decreasing"):
        sm.equal_error_rate(torch.tensor([0.0, 0.5, 0.2]), torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"\(T,\)"):
        sm.equal_error_rate(torch.tensor([0.0, 1.0]), torch.tensor([1.0]))
