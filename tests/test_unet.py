import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, jaccard_score
from torch import nn

from dlarch_lib.cnn import receptive_field
from dlarch_lib.unet import (
    UNet,
    border_weights,
    boundary_band,
    checkerboard_share,
    class_balance_weights,
    confusion_matrix,
    count_objects,
    dice,
    gap_pixels,
    gradient_support,
    iou,
    linearised,
    make_touching,
    predict,
    segmentation_step,
    soft_dice_loss,
    two_nearest_object_distances,
    upsampler,
    weighted_segmentation_step,
)


@pytest.mark.parametrize("depth,in_channels", [(1, 1), (2, 3), (3, 1)])
def test_unet_shapes(depth, in_channels):
    model = UNet(in_channels=in_channels, num_classes=5, width=4, depth=depth)
    x = torch.randn(2, in_channels, 16, 24)
    assert model(x).shape == (2, 5, 16, 24)
    bottleneck, skips = model.encode(x)
    assert bottleneck.shape == (2, 4 * 2**depth, 16 // 2**depth, 24 // 2**depth)
    assert [s.shape[1:] for s in skips] == [(4 * 2**lv, 16 // 2**lv, 24 // 2**lv) for lv in range(depth)]


def test_no_skip_model_has_same_parameters_and_equals_zeroed_skip_weights():
    torch.manual_seed(0)
    with_skips, without = UNet(width=4, depth=2), UNet(width=4, depth=2, skips=False)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(with_skips) == count(without)
    without.load_state_dict(with_skips.state_dict())
    x = torch.randn(3, 1, 16, 16)
    with_skips.eval(), without.eval()
    assert not torch.allclose(with_skips(x), without(x))
    # feeding zeros to the skip half == zeroing the weights that read the skip half
    with torch.no_grad():
        for fuse in with_skips.fuse:
            conv = fuse[0]
            conv.weight[:, conv.in_channels // 2 :] = 0
    torch.testing.assert_close(with_skips(x), without(x))


def test_unet_errors():
    model = UNet(width=4, depth=2)
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 1, 18, 16))
    with pytest.raises(ValueError, match="depth"):
        UNet(depth=0)


def test_predict_is_argmax():
    model = UNet(width=4, depth=1)
    x = torch.randn(5, 1, 8, 8)
    masks = predict(model, x, batch_size=2)
    assert masks.shape == (5, 8, 8) and masks.dtype == torch.int64
    with torch.no_grad():
        assert torch.equal(masks, model(x).argmax(dim=1))


def test_receptive_field_of_the_bottleneck_matches_the_measurement():
    model = linearised(UNet(width=2, depth=2))
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in model.modules())
    expected = receptive_field([(3, 1), (3, 1), (2, 2)] * 2 + [(3, 1), (3, 1)])  # chapter 4's recursion
    assert gradient_support(lambda x: model.encode(x)[0], 64) == expected == 32
    with pytest.raises(ValueError, match="feature maps"):
        gradient_support(lambda x: x.flatten(), 8)


def test_segmentation_step_is_cross_entropy_plus_soft_dice():
    torch.manual_seed(0)
    model = UNet(width=4, depth=1)
    images, masks = torch.randn(2, 1, 8, 8), torch.randint(0, 4, (2, 8, 8))
    logits = model(images)
    expected = F.cross_entropy(logits, masks) + soft_dice_loss(logits, masks)
    torch.testing.assert_close(segmentation_step(model, (images, masks)), expected)


def test_metrics_hand_computed():
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 0]])
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[2, 1, 0], [1, 2, 0], [1, 0, 1]]
    per_class, mean = iou(pred, target, 3)
    # class 0: |P∩T| = 2, |P| = 4, |T| = 3 -> 2/5; class 1: 2/(3+3-2) = 1/2; class 2: 1/(1+2-1) = 1/2
    torch.testing.assert_close(per_class, torch.tensor([0.4, 0.5, 0.5], dtype=torch.float64))
    assert mean == pytest.approx(1.4 / 3)
    per_class_d, mean_d = dice(pred, target, 3)
    torch.testing.assert_close(per_class_d, torch.tensor([4 / 7, 4 / 6, 2 / 3], dtype=torch.float64))
    assert mean_d == pytest.approx((4 / 7 + 2 / 3 + 2 / 3) / 3)
    torch.testing.assert_close(per_class_d, 2 * per_class / (1 + per_class))  # D = 2J / (1 + J)


def test_metrics_match_sklearn_and_skip_absent_classes():
    g = torch.Generator().manual_seed(0)
    target, pred = torch.randint(0, 4, (2, 10, 10), generator=g), torch.randint(0, 4, (2, 10, 10), generator=g)
    per_class, _ = iou(pred, target, 4)
    per_class_d, _ = dice(pred, target, 4)
    ref_iou = jaccard_score(target.flatten(), pred.flatten(), average=None, labels=range(4))
    ref_dice = f1_score(target.flatten(), pred.flatten(), average=None, labels=range(4))
    torch.testing.assert_close(per_class, torch.from_numpy(ref_iou))
    torch.testing.assert_close(per_class_d, torch.from_numpy(ref_dice))
    per_class, mean = iou(torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]), 3)
    assert per_class[2].isnan() and mean == pytest.approx((0.5 + 0.0) / 2)


def test_metric_errors():
    with pytest.raises(ValueError, match="same shape"):
        iou(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="integer"):
        dice(torch.zeros(4), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="num_classes"):
        iou(torch.tensor([0]), torch.tensor([0]), 1)


def test_boundary_band():
    masks = torch.zeros(1, 6, 6, dtype=torch.long)
    masks[0, 2:4, 2:4] = 1
    expected = torch.zeros(1, 6, 6, dtype=torch.bool)
    expected[0, 1:5, 1:5] = True
    assert torch.equal(boundary_band(masks, width=1), expected)
    assert boundary_band(masks, width=2).sum() == 36
    assert not boundary_band(torch.ones(2, 5, 5, dtype=torch.long)).any()  # the image border is no edge
    with pytest.raises(ValueError, match="expected masks"):
        boundary_band(torch.zeros(6, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="width"):
        boundary_band(masks, width=0)


def test_soft_dice_loss():
    target = torch.tensor([[[0, 1], [2, 2]]])  # (1, 2, 2)
    perfect = 50.0 * torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()  # (1, 3, 2, 2)
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    # with hard probabilities and eps = 0 the soft loss is 1 - mean Dice
    wrong = 50.0 * torch.nn.functional.one_hot(torch.tensor([[[0, 0], [2, 1]]]), 3).permute(0, 3, 1, 2).float()
    _, mean_dice = dice(wrong.argmax(dim=1), target, 3)
    assert soft_dice_loss(wrong, target, eps=0.0).item() == pytest.approx(1 - mean_dice, abs=1e-6)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    soft_dice_loss(logits, torch.randint(0, 3, (2, 4, 4))).backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="expected logits"):
        soft_dice_loss(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))


def test_upsamplers_double_the_resolution_and_resize_has_no_checkerboard():
    x = torch.ones(2, 3, 5, 5)
    for kind in ("transposed", "resize"):
        up = upsampler(3, 4, kind)
        assert up(torch.randn(2, 3, 5, 7)).shape == (2, 4, 10, 14)
    with torch.no_grad():
        y_t = upsampler(3, 4, "transposed")(x)[:, :, 2:8, 2:8]
        y_r = upsampler(3, 4, "resize")(x)[:, :, 2:8, 2:8]  # interior: away from the zero padding
    assert checkerboard_share(y_t).min() > 0.99  # a constant input: the output is pure period-2 pattern
    torch.testing.assert_close(y_r, y_r[:, :, :1, :1].expand_as(y_r))  # constant in, constant out
    with pytest.raises(ValueError, match="kind"):
        upsampler(3, 4, "bilinear")
    with pytest.raises(ValueError, match="upsample"):
        UNet(upsample="pixelshuffle")
    assert UNet(width=4, depth=2, upsample="resize")(torch.rand(1, 1, 16, 16)).shape == (1, 4, 16, 16)


def test_checkerboard_share_values():
    board = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(4, 4)
    torch.testing.assert_close(checkerboard_share(board), torch.tensor(1.0))
    smooth = torch.outer(torch.linspace(0, 1, 16), torch.ones(16))  # a ramp: almost no period-2 part
    assert checkerboard_share(smooth) < 0.02  # (step/2)^2 over the ramp's variance: 0.013
    mixed = smooth + 0.1 * board.repeat(2, 2)
    assert 0.01 < checkerboard_share(mixed) < 0.99
    with pytest.raises(ValueError, match="even"):
        checkerboard_share(torch.zeros(3, 5))


def test_border_weights_single_out_gaps_between_objects():
    inst = torch.zeros(2, 12, 12, dtype=torch.long)
    inst[0, 2:10, 1:5], inst[0, 2:10, 6:11] = 1, 2  # two objects, one background column (x = 5) between them
    inst[1, 3:8, 3:8] = 1  # a single object
    masks = (inst > 0).long()
    w = border_weights(inst, masks, num_classes=2, w0=10.0, sigma=2.0)
    assert w.shape == (2, 12, 12)
    gap, far_edge = w[0, 5, 5], w[0, 5, 0]  # in the gap (d1 = d2 = 1), and at x = 0 beside object 1 only
    assert gap > 3 and far_edge < 1.5 and gap > 5 * far_edge
    counts = torch.bincount(masks.flatten(), minlength=2).double()
    expected_single = (masks.numel() / (2 * counts))[masks[1]].float()
    torch.testing.assert_close(w[1], expected_single)  # one object: only the class term
    with pytest.raises(ValueError, match="instances"):
        border_weights(inst[0], masks[0], 2)
    with pytest.raises(ValueError, match="sigma"):
        border_weights(inst, masks, 2, sigma=0.0)


def test_two_nearest_object_distances_and_class_weights():
    inst = torch.zeros(6, 6, dtype=torch.long)
    assert two_nearest_object_distances(inst) is None
    inst[0, 0], inst[0, 5] = 1, 2
    d1, d2 = two_nearest_object_distances(inst)
    assert d1[0, 0] == 0 and d2[0, 0] == 5 and d1[0, 2] == 2 and d2[0, 2] == 3
    masks = torch.tensor([0, 0, 0, 1])
    torch.testing.assert_close(class_balance_weights(masks, 3), torch.tensor([4 / 6, 2.0, 0.0], dtype=torch.float64))


def test_weighted_step_by_hand_and_against_class_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(2, 3, 4, 5, generator=g), torch.randint(0, 3, (2, 4, 5), generator=g)
    weights = torch.rand(2, 4, 5, generator=g)
    identity = nn.Identity()
    # by hand: -log softmax of the true class at every pixel, weighted, over the weight sum
    log_p = logits.log_softmax(dim=1).gather(1, masks[:, None])[:, 0]  # (2, 4, 5)
    expected = -(weights * log_p).sum() / weights.sum()
    ce_only = weighted_segmentation_step(identity, (logits, masks, weights), dice_loss=False)
    torch.testing.assert_close(ce_only, expected)
    with_dice = weighted_segmentation_step(identity, (logits, masks, weights))
    torch.testing.assert_close(with_dice, expected + soft_dice_loss(logits, masks))
    # weights that depend on the class only: PyTorch's weighted cross-entropy
    omega = torch.tensor([0.3, 1.0, 4.0])
    torch.testing.assert_close(
        weighted_segmentation_step(identity, (logits, masks, omega[masks]), dice_loss=False),
        F.cross_entropy(logits, masks, weight=omega),
    )
    # constant weights: the plain step
    torch.testing.assert_close(
        weighted_segmentation_step(identity, (logits, masks, torch.full_like(weights, 2.5))),
        segmentation_step(identity, (logits, masks)),
    )
    with pytest.raises(ValueError, match="weights"):
        weighted_segmentation_step(identity, (logits, masks, weights[:, :, :4]))


def test_make_touching_has_gaps_between_separate_cells_and_is_seeded():
    data = make_touching(64, seed=3)
    assert data.images.shape == (64, 1, 32, 32) and data.images.dtype == torch.float32
    assert data.masks.dtype == torch.int64 and set(data.masks.unique().tolist()) == {0, 1}
    assert torch.equal(data.masks, (data.instances > 0).long())
    cells = torch.tensor([len(inst.unique()) - 1 for inst in data.instances])  # (64,)
    assert cells.min() >= 2 and cells.max() <= 4 and len(cells.unique()) == 3
    # the gaps separate the cells: one connected component per cell (nearly always)
    assert (count_objects(data.masks) == cells).float().mean() >= 0.95
    # every image has gap pixels between two cells, and the gaps are at most a few pixels wide
    gaps = gap_pixels(data.instances)
    assert gaps.flatten(1).any(dim=1).all()
    for inst in data.instances[:8]:
        d1, d2 = two_nearest_object_distances(inst)
        between = (inst == 0) & (d2 <= 3)  # background next to two cells
        assert between.any() and (d1[inst == 0] + d2[inst == 0]).min() <= 3
    a, b = make_touching(8, seed=5), make_touching(8, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.instances, b.instances)
    assert not torch.equal(a.instances, make_touching(8, seed=6).instances)
    with pytest.raises(ValueError, match="objects"):
        make_touching(4, objects=(1, 3))
    with pytest.raises(ValueError, match="gap"):
        make_touching(4, gap=(0.2, 1.0))


def test_gap_pixels_and_count_objects():
    inst = torch.zeros(2, 8, 10, dtype=torch.long)
    inst[0, 1:7, 1:4], inst[0, 1:7, 5:9] = 1, 2  # a one-pixel gap at x = 4
    inst[1, 2:6, 2:6] = 1  # one object: no gap
    gaps = gap_pixels(inst)
    # the gap column, and its two ends just past the objects' corners (d1 = d2 = sqrt 2): 8 pixels
    assert gaps[0, :, 4].all() and gaps[0].sum() == 8 and not gaps[1].any()
    merged = (inst > 0).clone()
    assert count_objects(merged).tolist() == [2, 1]
    merged[0, 3, 4] = True  # fill one gap pixel: the two objects become one
    assert count_objects(merged).tolist() == [1, 1]
    specks = torch.zeros(1, 8, 8, dtype=torch.bool)
    specks[0, 0, 0], specks[0, 4:7, 4:7] = True, True  # a one-pixel speck and a 3x3 blob
    assert count_objects(specks).item() == 2 and count_objects(specks, min_size=4).item() == 1
    diagonal = torch.eye(3, dtype=torch.bool)[None]  # touching only at corners: 4-connectivity keeps them apart
    assert count_objects(diagonal).item() == 3
    with pytest.raises(ValueError, match="min_size"):
        count_objects(specks, min_size=0)
    with pytest.raises(ValueError, match="foreground"):
        count_objects(specks[0])
    with pytest.raises(ValueError, match="instances"):
        gap_pixels(inst[0])
