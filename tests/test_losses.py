"""Group softmax (BAGS) classifier loss: values, activation and mmdet integration."""

import math

import pytest
import torch

from crat_ft.heads.losses import GroupSoftmaxLoss, class_groups

COUNTS = [3, 50, 2, 700, 5000, 12]  # groups: [0, 2], [1, 5], [3], [4]


def test_class_groups_bin_by_instance_count():
    assert class_groups(COUNTS) == [[0, 2], [1, 5], [3], [4]]
    assert class_groups([1, 2, 3]) == [[0, 1, 2]]  # empty groups are dropped
    assert class_groups(COUNTS, group_bounds=(100,)) == [[0, 1, 2, 5], [3, 4]]


def _ce(logits, target):
    return -logits[target] + torch.logsumexp(logits, 0)


def test_loss_equals_group_cross_entropies():
    torch.manual_seed(0)
    loss = GroupSoftmaxLoss(6, COUNTS, others_ratio=8.0)
    assert loss.get_cls_channels(6) == 6 + 2 + 4
    score = torch.randn(5, 12)
    label = torch.tensor([0, 5, 6, 3, 6])  # 6 = background
    got = loss(score, label)
    # by hand: group 0 = [bg (6), fg (7)]; group j = its classes then "others" at 8 + j
    groups = [[0, 2], [1, 5], [3], [4]]
    total = 0.0
    for n, y in enumerate(label.tolist()):
        total += _ce(score[n, [6, 7]], 1 if y < 6 else 0)
        for j, members in enumerate(groups):
            logits = score[n, members + [8 + j]]
            target = members.index(y) if y in members else len(members)
            total += _ce(logits, target)  # others_ratio 8 keeps every "others" RoI at weight 1 here
    torch.testing.assert_close(got, total / 5)
    torch.testing.assert_close(loss(score, label, avg_factor=2.0), total / 2)
    torch.testing.assert_close(loss(score, label, reduction_override="none").sum(), total)


def test_others_are_down_weighted_to_the_ratio():
    loss = GroupSoftmaxLoss(6, COUNTS, others_ratio=1.0)
    score = torch.zeros(10, 12)
    label = torch.tensor([4] + [6] * 9)  # one RoI of group 3, nine background
    per = loss(score, label, reduction_override="none")
    # group 0: binary CE log 2 each. group [0,2]: no own RoI, 10 others share weight 1 (ratio 1 x max(0, 1)) -> 0.1 each
    # of log 3; same for [1,5]; group [3]: 10 others at 0.1 each of log 2; group [4]: own RoI weight 1, 9 others share 1
    expect_bg = math.log(2) + 0.1 * math.log(3) * 2 + 0.1 * math.log(2) + (1 / 9) * math.log(2)
    expect_pos = math.log(2) + 0.1 * math.log(3) * 2 + 0.1 * math.log(2) + math.log(2)
    torch.testing.assert_close(per[1:], torch.full((9,), expect_bg))
    torch.testing.assert_close(per[0], torch.tensor(expect_pos))


def test_activation_is_foreground_times_group_probability():
    torch.manual_seed(1)
    loss = GroupSoftmaxLoss(6, COUNTS)
    score = torch.randn(4, 12)
    act = loss.get_activation(score)
    assert act.shape == (4, 7)
    p0 = torch.softmax(score[:, [6, 7]], 1)
    torch.testing.assert_close(act[:, 6], p0[:, 0])
    p_group = torch.softmax(score[:, [1, 5, 9]], 1)  # group [1, 5] with its "others" logit
    torch.testing.assert_close(act[:, 5], p0[:, 1] * p_group[:, 1])
    # a class score is bounded by p(foreground); groups are separate softmaxes, so rows need not sum to 1
    assert (act[:, :6] <= p0[:, 1:2] + 1e-6).all() and (act >= 0).all()


def test_a_classifier_trained_with_it_separates_classes():
    """Linear classifier on separable clusters: get_activation's argmax recovers the labels, rare ones too."""
    torch.manual_seed(0)
    counts = [2, 5, 40, 300, 300]
    centers = torch.randn(6, 8) * 4
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts + [400])])  # 5 = background
    x = centers[labels] + torch.randn(len(labels), 8) * 0.5
    loss = GroupSoftmaxLoss(5, counts)
    fc = torch.nn.Linear(8, loss.get_cls_channels(5))
    opt = torch.optim.Adam(fc.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss(fc(x), labels).backward()
        opt.step()
    with torch.no_grad():
        pred = loss.get_activation(fc(x)).argmax(1)
    for c in range(6):
        assert (pred[labels == c] == c).float().mean() > 0.9, c
    acc = loss.get_accuracy(fc(x), labels)
    assert acc["acc_objectness"] > 95 and acc["acc_classes"] > 90


def test_mmdet_bbox_head_builds_trains_and_predicts_with_it():
    import mmdet.utils
    from mmdet.registry import MODELS

    mmdet.utils.register_all_modules(init_default_scope=True)
    head = MODELS.build(
        dict(
            type="Shared2FCBBoxHead",
            in_channels=4,
            fc_out_channels=16,
            roi_feat_size=7,
            num_classes=6,
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(type="GroupSoftmaxLoss", num_classes=6, class_instance_count=COUNTS),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        )
    )
    assert head.fc_cls.out_features == 12
    cls_score, bbox_pred = head(torch.randn(3, 4, 7, 7))
    labels = torch.tensor([0, 3, 6])
    losses = head.loss(
        cls_score, bbox_pred, torch.rand(3, 5) * 10, labels, torch.ones(3), torch.zeros(3, 4), torch.zeros(3, 4)
    )
    assert set(losses) >= {"loss_cls", "acc_objectness", "acc_classes"} and torch.isfinite(losses["loss_cls"])
    with pytest.raises(ValueError, match="class_instance_count has 2 entries, num_classes is 6"):
        GroupSoftmaxLoss(6, [1, 2])


def test_dual_softmax_scores_mix_the_two_classifiers():
    from crat_ft.heads.losses import DualSoftmaxScores

    torch.manual_seed(2)
    dual = DualSoftmaxScores(3, original_weight=0.25)
    assert dual.get_cls_channels(3) == 8
    score = torch.randn(5, 8)
    expect = 0.75 * torch.softmax(score[:, :4], 1) + 0.25 * torch.softmax(score[:, 4:], 1)
    torch.testing.assert_close(dual.get_activation(score), expect)
    torch.testing.assert_close(dual.get_activation(score).sum(1), torch.ones(5))
    label = torch.tensor([0, 1, 2, 3, 3])
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(dual(score, label), ce(score[:, :4], label) + ce(score[:, 4:], label))
    with pytest.raises(ValueError, match=r"original_weight should be in \[0, 1\], got 1.5"):
        DualSoftmaxScores(3, original_weight=1.5)
