"""CRAT math: closed forms against autograd, weights, losses, statistics."""

import pytest
import torch
import torch.nn.functional as F

from crat_ft.heads.transfusion import (
    FisherStats,
    box_sample_fisher,
    box_sample_grad,
    box_transfusion,
    box_transfusion_loss,
    gradient_mass_ratio,
    mask_sample_fisher,
    mask_transfusion_loss,
    sample_statistic,
    transfusion_weights,
)


def _autograd_box_fisher(feats, weight, bias, labels, target):
    out = []
    for n in range(feats.shape[0]):
        w = weight.detach().clone().requires_grad_(True)
        pred = (w @ feats[n] + bias).view(-1, 4)[labels[n]]
        loss = (pred - target[n]).abs().sum()
        (g,) = torch.autograd.grad(loss, w)
        out.append(g.view(-1, 4, feats.shape[1])[labels[n]].square())
    return torch.stack(out)


def test_box_fisher_equals_autograd_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    p, d, c = 12, 16, 5
    feats = torch.randn(p, d, generator=g).relu()
    weight, bias = torch.randn(4 * c, d, generator=g), torch.randn(4 * c, generator=g)
    labels = torch.randint(0, c, (p,), generator=g)
    target = torch.randn(p, 4, generator=g)
    pred = (feats @ weight.T + bias).view(p, c, 4)[torch.arange(p), labels]
    closed = box_sample_fisher(feats, pred, target)
    ref = _autograd_box_fisher(feats, weight, bias, labels, target)
    assert closed.shape == (p, 4, d)
    torch.testing.assert_close(closed, ref, rtol=1e-5, atol=1e-6)


def test_mask_fisher_equals_autograd_per_sample_loop():
    g = torch.Generator().manual_seed(1)
    p, k, s, c = 6, 8, 7, 4
    feats = torch.randn(p, k, s, s, generator=g)
    conv = torch.nn.Conv2d(k, c, 1)
    labels = torch.randint(0, c, (p,), generator=g)
    target = (torch.rand(p, s, s, generator=g) > 0.5).float()
    logits = conv(feats)[torch.arange(p), labels]
    closed = mask_sample_fisher(feats, logits.detach(), target)
    ref = []
    for n in range(p):
        z = conv(feats[n : n + 1])[0, labels[n]]
        loss = F.binary_cross_entropy_with_logits(z, target[n])  # mean over S*S pixels
        (gw,) = torch.autograd.grad(loss, conv.weight)
        ref.append(gw[labels[n], :, 0, 0].square())
    torch.testing.assert_close(closed, torch.stack(ref), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_normed_mask_gradient_equals_autograd_through_mmdets_normed_conv(power):
    """mmdet's NormedConv2d (Seesaw's normed mask predictor): the closed form through the normalisation."""
    from mmdet.models.layers import NormedConv2d

    from crat_ft.heads.transfusion import normed_mask_sample_grad

    g = torch.Generator().manual_seed(2)
    p, k, s, c = 6, 8, 7, 4
    feats = torch.randn(p, k, s, s, generator=g).relu()
    torch.manual_seed(3)
    conv = NormedConv2d(k, c, 1, tempearture=20, power=power)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(c, k, 1, 1, generator=g) * 0.3)
    labels = torch.randint(0, c, (p,), generator=g)
    target = (torch.rand(p, s, s, generator=g) > 0.5).float()
    logits = conv(feats)[torch.arange(p), labels].detach()
    closed = normed_mask_sample_grad(
        feats, logits, target, conv.weight.detach().flatten(1)[labels], temperature=20, power=power, eps=conv.eps
    )
    ref = []
    for n in range(p):
        loss = F.binary_cross_entropy_with_logits(conv(feats[n : n + 1])[0, labels[n]], target[n])
        (gw,) = torch.autograd.grad(loss, conv.weight)
        ref.append(gw[labels[n], :, 0, 0])
    torch.testing.assert_close(closed, torch.stack(ref), rtol=1e-4, atol=1e-7)
    assert closed.abs().sum() > 0


def test_fisher_stats_ema_and_seen():
    stats = FisherStats(4, (3,), momentum=0.5)
    f = torch.tensor([[2.0, 0, 0], [4.0, 0, 0], [0, 1.0, 0]])
    stats.update(f, torch.tensor([1, 1, 3]))
    torch.testing.assert_close(stats.fisher[1], torch.tensor([1.5, 0, 0]))  # 0.5 * mean(2, 4)
    torch.testing.assert_close(stats.fisher[3], torch.tensor([0, 0.5, 0]))
    assert stats.seen.tolist() == [False, True, False, True]
    stats.update(torch.tensor([[0, 0, 2.0]]), torch.tensor([1]))
    torch.testing.assert_close(stats.fisher[1], torch.tensor([0.75, 0, 1.0]))
    torch.testing.assert_close(stats.fisher[3], torch.tensor([0, 0.5, 0]))  # absent: unchanged
    assert set(dict(stats.named_buffers())) == {"fisher", "seen"}
    with pytest.raises(ValueError, match=r"momentum should be in \(0, 1\], but got 0"):
        FisherStats(3, 2, momentum=0)


def test_weights_exclude_own_and_unseen_and_sum_to_one():
    g = torch.Generator().manual_seed(2)
    stats = FisherStats(6, (4, 5))
    stats.update(torch.rand(10, 4, 5, generator=g), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1]))  # 4, 5 unseen
    sample = torch.rand(7, 4, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    w = transfusion_weights(sample, stats, labels, temperature=0.05)
    assert w.shape == (7, 6)
    assert (w[torch.arange(7), labels] == 0).all()
    assert (w[:, 4:] == 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(7))
    assert not w.requires_grad


def test_control_donors_uniform_and_permuted():
    g = torch.Generator().manual_seed(5)
    stats = FisherStats(6, (4, 5))
    stats.update(torch.rand(12, 4, 5, generator=g), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]))  # 5 unseen
    sample = torch.rand(5, 4, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 5])
    uniform = transfusion_weights(sample, stats, labels, 0.05, donors="uniform")
    expected = torch.full((5, 6), 0.25)
    expected[torch.arange(5), labels] = 0
    expected[:, 5] = 0
    expected[4, :5] = 0.2  # class 5 is unseen: its samples give to all five seen classes
    torch.testing.assert_close(uniform, expected)
    # permuted: the same softmax with class c scored by the statistics of class perm[c]
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    moved = FisherStats(6, (4, 5))
    moved.fisher.copy_(stats.fisher[perm])
    moved.seen.copy_(stats.seen)
    permuted = transfusion_weights(sample, stats, labels, 0.05, donors="permuted")
    torch.testing.assert_close(permuted, transfusion_weights(sample, moved, labels, 0.05))
    assert not torch.allclose(permuted, transfusion_weights(sample, stats, labels, 0.05))
    torch.testing.assert_close(permuted.sum(1), torch.ones(5))
    with pytest.raises(ValueError, match="donors should be one of"):
        transfusion_weights(sample, stats, labels, 0.05, donors="random")


def test_gradient_mass_ratio_is_the_ratio_of_gradient_norms():
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(5, 12)
    x, t = torch.rand(8, 5, generator=g), torch.rand(8, 12, generator=g)
    own = (layer(x) - t).abs().sum() / 8
    trans = 0.001 * (layer(x) - t.flip(0)).abs().sum()
    (g_own,) = torch.autograd.grad(own, layer.weight, retain_graph=True)
    (g_tr,) = torch.autograd.grad(trans, layer.weight, retain_graph=True)
    ratio = gradient_mass_ratio(own, trans, layer.weight)
    assert float(ratio) == pytest.approx(float(g_tr.norm() / g_own.norm())) and 0 < float(ratio) < 1
    assert not ratio.requires_grad
    (own + trans).backward()  # the graph is still there for the training step
    with torch.no_grad():
        assert float(gradient_mass_ratio(layer(x).sum(), layer(x).sum(), layer.weight)) == 0.0


def test_weights_golden_and_rows_without_receivers():
    stats = FisherStats(3, (2,), momentum=1.0)
    stats.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    sample = torch.tensor([[1.0, 1.0], [3.0, 1.0]])
    w = transfusion_weights(sample, stats, torch.tensor([2, 1]), temperature=1.0)
    # row 0: own class 2 (no stats); cos to class 0 and 1 both 1/sqrt(2) -> 0.5 each
    torch.testing.assert_close(w[0], torch.tensor([0.5, 0.5, 0.0]))
    # row 1: own class 1, only class 0 seen and eligible -> weight 1
    torch.testing.assert_close(w[1], torch.tensor([1.0, 0.0, 0.0]))
    # a row with no eligible class is all zero, not NaN
    lonely = FisherStats(3, (2,))
    lonely.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    w = transfusion_weights(torch.tensor([[1.0, 2.0]]), lonely, torch.tensor([0]), temperature=0.05)
    assert torch.equal(w, torch.zeros(1, 3))


def test_temperature_sharpens_and_top_k():
    g = torch.Generator().manual_seed(3)
    stats = FisherStats(8, (6,))
    stats.update(torch.rand(16, 6, generator=g), torch.arange(16) % 8)
    sample, labels = torch.rand(4, 6, generator=g), torch.tensor([0, 1, 2, 3])
    soft = transfusion_weights(sample, stats, labels, temperature=1.0)
    sharp = transfusion_weights(sample, stats, labels, temperature=0.01)
    assert (sharp.max(1).values > soft.max(1).values).all()
    top2 = transfusion_weights(sample, stats, labels, temperature=1.0, top_k=2)
    assert ((top2 > 0).sum(1) == 2).all()
    torch.testing.assert_close(top2.sum(1), torch.ones(4))


def test_box_loss_value_and_gradient_proportional_to_weight():
    pred = torch.zeros(2, 3, 4, requires_grad=True)
    target = torch.tensor([[1.0, -1.0, 2.0, 0.5], [0.0, 0.0, 0.0, 1.0]])
    weights = torch.tensor([[0.0, 0.25, 0.75], [1.0, 0.0, 0.0]])
    loss = box_transfusion_loss(pred, target, weights)
    torch.testing.assert_close(loss, torch.tensor(4.5 * 0.25 + 4.5 * 0.75 + 1.0))
    loss.backward()
    # class 2's slice gets 3x the gradient of class 1's from sample 0; class 0 none from sample 0
    torch.testing.assert_close(pred.grad[0, 2], 3 * pred.grad[0, 1])
    assert torch.equal(pred.grad[0, 0], torch.zeros(4))


def test_mask_loss_matches_dense_reference():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 5, 5, generator=g, requires_grad=True)
    target = (torch.rand(3, 5, 5, generator=g) > 0.5).float()
    weights = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.1, 0.0, 0.0, 0.9], [0.0, 0.0, 0.0, 0.0]])
    dense = F.binary_cross_entropy_with_logits(logits, target[:, None].expand_as(logits), reduction="none").mean((2, 3))
    torch.testing.assert_close(mask_transfusion_loss(logits, target, weights), (weights * dense).sum())


def test_empty_batches_give_zero_with_graph():
    lin = torch.nn.Linear(5, 12)
    pred_all = lin(torch.zeros(0, 5)).view(0, 3, 4)
    loss = box_transfusion_loss(pred_all, torch.zeros(0, 4), torch.zeros(0, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert lin.weight.grad is not None and torch.equal(lin.weight.grad, torch.zeros_like(lin.weight))
    conv = torch.nn.Conv2d(2, 3, 1)
    logits = conv(torch.zeros(0, 2, 4, 4))
    mloss = mask_transfusion_loss(logits, torch.zeros(0, 4, 4), torch.zeros(0, 3))
    assert mloss.item() == 0.0 and mloss.requires_grad
    mloss.backward()
    assert conv.weight.grad is not None
    stats = FisherStats(3, (2,))
    assert transfusion_weights(torch.zeros(0, 2), stats, torch.zeros(0, dtype=torch.long), 0.05).shape == (0, 3)


def test_inputs_not_mutated():
    g = torch.Generator().manual_seed(5)
    feats, pred, target = torch.rand(4, 6, generator=g), torch.rand(4, 4, generator=g), torch.rand(4, 4, generator=g)
    copies = [t.clone() for t in (feats, pred, target)]
    box_sample_fisher(feats, pred, target)
    for a, b in zip((feats, pred, target), copies):
        assert torch.equal(a, b)


def test_crat_config_refuses_unknown_donors_and_non_bool_log_mass():
    from crat_ft.common.errors import UserError
    from crat_ft.heads.ft_config import CratConfig

    assert CratConfig.from_dict({"donors": "uniform", "log_mass": True}).donors == "uniform"
    with pytest.raises(
        UserError, match=r"crat.donors: expected one of \('fisher', 'uniform', 'permuted'\), got 'random'"
    ):
        CratConfig.from_dict({"donors": "random"})
    with pytest.raises(UserError, match="crat.log_mass: expected True or False"):
        CratConfig.from_dict({"log_mass": 1})


def test_signed_fisher_tells_residual_directions_apart():
    # three classes, the same features; classes 0 and 1 regress too high, class 2 too low
    feats = torch.tensor([[1.0, 0.5]] * 3)
    target = torch.zeros(3, 4)
    pred_own = torch.tensor([[1.0] * 4, [2.0] * 4, [-1.0] * 4])
    labels = torch.tensor([0, 1, 2])
    grads = box_sample_grad(feats, pred_own, target)
    weights = {}
    for fisher in ("sample", "signed"):
        stats = FisherStats(3, (4, 2), momentum=1.0)
        sample = sample_statistic(labels, 3, grads, fisher)
        stats.update(sample, labels)
        weights[fisher] = transfusion_weights(sample, stats, labels, 0.05)
    # squared, the L1 gradient is 1 (x) x^2 for every class: no class is told from another
    torch.testing.assert_close(weights["sample"][0], torch.tensor([0.0, 0.5, 0.5]))
    # signed, class 0's donations go to the class pulled the same way (cosines +1 and -1, tau 0.05)
    assert weights["signed"][0, 1] > 1 - 1e-6 and weights["signed"][0, 2] < 1e-6
    torch.testing.assert_close(stats.fisher[2], -grads[0])  # the statistic keeps the sign
    pred_all = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(0))
    stats = FisherStats(3, (4, 2), momentum=1.0)
    loss = box_transfusion(feats, pred_all, pred_own, target, labels, stats, temperature=0.05, fisher="signed")
    torch.testing.assert_close(loss, box_transfusion_loss(pred_all, target, weights["signed"]))


def test_crat_config_accepts_signed_fisher_and_refuses_others():
    from crat_ft.common.errors import UserError
    from crat_ft.heads.ft_config import CratConfig

    assert CratConfig.from_dict({"fisher": "signed"}).fisher == "signed"
    with pytest.raises(
        UserError, match=r"crat.fisher: expected one of \('sample', 'reference', 'signed'\), got 'squared'"
    ):
        CratConfig.from_dict({"fisher": "squared"})
