import pytest
import torch
import torch.nn.functional as F

from dlarch_lib import detect


def test_box_iou_hand_computed_cases():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 3], [3, 3, 4, 4], [0.5, 0.5, 1.5, 1.5], [2, 0, 4, 2]])
    iou = detect.box_iou(a, b)
    torch.testing.assert_close(
        iou, torch.tensor([[1.0, 1 / 7, 0.0, 0.25, 0.0]])
    )  # identical, overlap, disjoint, contained, touching
    assert detect.box_iou(b, a).shape == (5, 1)
    torch.testing.assert_close(detect.box_iou(b, b), detect.box_iou(b, b).T)


def test_box_iou_matches_brute_force_cell_count():
    g = torch.Generator().manual_seed(0)
    xy = torch.randint(0, 10, (12, 2), generator=g)
    wh = torch.randint(1, 6, (12, 2), generator=g)
    boxes = torch.cat([xy, xy + wh], 1).float()
    ref = torch.tensor(detect.iou_matrix_brute_force(boxes[:6].tolist(), boxes[6:].tolist()))
    torch.testing.assert_close(detect.box_iou(boxes[:6], boxes[6:]), ref)


def test_box_errors():
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        detect.box_iou(torch.zeros(3, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="Tensor"):
        detect.box_area([[0, 0, 1, 1]])
    assert detect.box_area(torch.tensor([[2.0, 2, 1, 5]])).item() == 0.0


def test_nms_hand_case_and_sort_matters():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 1, 10, 11]])
    scores = torch.tensor([0.6, 0.9, 0.8, 0.7])
    assert detect.nms(boxes, scores, 0.5).tolist() == [1, 2]
    # without the sort the first (weaker) box survives and suppresses the best one
    unsorted = detect.nms(boxes, scores, 0.5, sort=False).tolist()
    assert unsorted == [0, 2] and unsorted != detect.nms(boxes, scores, 0.5).tolist()
    assert detect.nms(boxes, scores, 1.0).tolist() == [1, 2, 3, 0]  # nothing suppressed
    with pytest.raises(ValueError, match="scores"):
        detect.nms(boxes, scores[:2])
    with pytest.raises(ValueError, match="iou_threshold"):
        detect.nms(boxes, scores, 1.5)


def test_batched_nms_is_per_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [1, 1, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert detect.batched_nms(boxes, scores, torch.tensor([1, 2, 1])).tolist() == [0, 1]
    assert detect.batched_nms(boxes, scores, torch.tensor([1, 1, 1])).tolist() == [0]
    with pytest.raises(ValueError, match="labels"):
        detect.batched_nms(boxes, scores, torch.tensor([1, 2]))


def test_average_precision_hand_computed():
    # ranks: TP, FP, TP, FP with 3 objects: P = 1, 1/2, 2/3, 1/2 at R = 1/3, 1/3, 2/3, 2/3
    tp, scores = torch.tensor([1, 0, 1, 0]).bool(), torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert detect.average_precision(tp, scores, 3) == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3)
    assert detect.average_precision(tp, scores, 3, interpolate=False) == pytest.approx(1 / 3 + 1 / 3 * 2 / 3)
    # interpolation lifts a dip: TP FP FP TP TP (4 objects)
    tp2, s2 = torch.tensor([1, 0, 0, 1, 1]).bool(), torch.linspace(1, 0.1, 5)
    assert detect.average_precision(tp2, s2, 4) == pytest.approx(0.25 * 1 + 0.5 * 0.6)
    assert detect.average_precision(tp2, s2, 4, interpolate=False) == pytest.approx(0.25 + 0.25 * 0.5 + 0.25 * 0.6)
    assert detect.average_precision(torch.ones(2).bool(), torch.tensor([0.5, 0.4]), 2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_gt"):
        detect.average_precision(tp, scores, 0)
    recall, precision = detect.precision_recall(tp, scores, 3)
    torch.testing.assert_close(recall, torch.tensor([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(precision, torch.tensor([1, 1, 1 / 2, 2 / 3, 1 / 2], dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D"):
        detect.precision_recall(tp, scores[:2], 3)


def test_average_precision_matches_sklearn_and_brute_force():
    sklearn = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        tp = torch.rand(40, generator=g) < 0.5
        scores = torch.randperm(40, generator=g).float()  # distinct scores: no ties
        # when every object is detected somewhere, sklearn's AP is the uninterpolated AP
        ours = detect.average_precision(tp, scores, int(tp.sum()), interpolate=False)
        assert ours == pytest.approx(sklearn.average_precision_score(tp.numpy(), scores.numpy()))
        # interpolated AP = integral of the precision envelope, checked on a fine recall grid
        order = scores.argsort(descending=True)
        hits = tp[order].double().cumsum(0)
        rec, prec = hits / tp.sum(), hits / torch.arange(1, 41)
        grid = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000
        reach = rec[None, :] >= grid[:, None]  # (R, K): which ranks reach recall r
        envelope = torch.where(reach, prec[None, :], torch.zeros(())).max(1).values  # max precision at recall >= r
        assert detect.average_precision(tp, scores, int(tp.sum())) == pytest.approx(envelope.mean().item(), abs=1e-3)
        assert detect.average_precision(tp, scores, int(tp.sum())) >= ours - 1e-12


def test_mean_average_precision_hand_case():
    gt_b = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([[5.0, 5, 15, 15]])]
    gt_l = [torch.tensor([1, 2]), torch.tensor([1])]
    pb = [torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]), torch.tensor([[0.0, 0, 4, 4]])]
    ps = [torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.95])]
    pl = [torch.tensor([1, 1, 2]), torch.tensor([1])]
    r = detect.mean_average_precision(pb, ps, pl, gt_b, gt_l)
    # class 1 ranking: FP (0.95, image 2), TP (0.9), FP (0.8, duplicate) -> AP = 1/2 * 1/2
    assert r["ap"][1] == pytest.approx(0.25) and r["ap"][2] == pytest.approx(1.0)
    assert r["map"] == pytest.approx(0.625)
    perfect = detect.mean_average_precision(gt_b, [torch.ones(2), torch.ones(1)], gt_l, gt_b, gt_l)
    assert perfect["map"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one entry per image"):
        detect.mean_average_precision(pb[:1], ps, pl, gt_b, gt_l)


def test_grid_encoding_round_trip():
    data = detect.detection_set(50, seed=3)
    for boxes, labels in zip(data.boxes, data.labels):
        t = detect.encode_grid(boxes, labels, 32, 8, 8.0)
        assert t.shape == (6, 8, 8) and ((t[1:3][:, t[0] > 0] >= 0) & (t[1:3][:, t[0] > 0] < 1)).all()
        decoded = detect.decode_grid(t[None, 0], t[None, 1:3], t[None, 3:5], 32, 8.0)[0][t[0] > 0]  # (k, 4)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2 // 4
        if len(set(map(tuple, centres.tolist()))) == len(boxes):  # no two objects share a cell
            iou = detect.box_iou(decoded, boxes)
            assert torch.allclose(iou.max(1).values, torch.ones(len(boxes)), atol=1e-5)
            assert sorted((t[5][t[0] > 0] + 1).long().tolist()) == sorted(labels.tolist())
    with pytest.raises(ValueError, match="divisible"):
        detect.encode_grid(data.boxes[0], data.labels[0], 30, 8, 8.0)


def test_tiny_yolo_shapes_loss_and_detect():
    torch.manual_seed(0)
    model = detect.TinyYOLO(width=4)
    data = detect.detection_set(6, seed=0)
    pred = model(data.images)
    assert pred.shape == (6, 8, 8, 8)
    targets = torch.stack([detect.encode_grid(b, lab, 32, 8, 8.0) for b, lab in zip(data.boxes, data.labels)])
    loss = detect.yolo_loss(pred, targets)
    torch.testing.assert_close(detect.yolo_step(model, (data.images, targets)), loss)
    loss.backward()
    assert loss.ndim == 0 and loss > 0 and model.head.weight.grad is not None
    boxes, scores, labels = detect.yolo_detect(model, data.images, score_threshold=0.0)
    assert len(boxes) == 6 and all(len(b) == len(s) == len(lab) for b, s, lab in zip(boxes, scores, labels))
    assert all(((lab >= 1) & (lab <= 3)).all() for lab in labels)
    with pytest.raises(ValueError, match="expected images"):
        model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="6 maps"):
        detect.yolo_loss(pred, targets[:, :5])
    with pytest.raises(ValueError, match="divisible by 4"):
        detect.TinyYOLO(size=30)


def test_bilinear_is_exact_on_a_ramp_and_matches_grid_sample():
    h, w = 7, 9
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    ramp = torch.stack([2 * xx - 3 * yy + 1, xx + yy])  # (2, H, W) linear in the pixel-centre coordinates
    g = torch.Generator().manual_seed(0)
    x, y = 0.5 + (w - 1) * torch.rand(50, generator=g), 0.5 + (h - 1) * torch.rand(50, generator=g)
    torch.testing.assert_close(detect.bilinear_sample(ramp, x, y), torch.stack([2 * x - 3 * y + 1, x + y]))
    # PyTorch's reference: grid_sample with align_corners=False uses the same pixel-centre convention
    x2, y2 = w * torch.rand(30, generator=g), h * torch.rand(30, generator=g)
    grid = torch.stack([2 * x2 / w - 1, 2 * y2 / h - 1], -1).view(1, 1, -1, 2)
    ref = F.grid_sample(ramp[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0]
    torch.testing.assert_close(detect.bilinear_sample(ramp, x2, y2), ref)
    assert (detect.bilinear_sample(ramp, torch.tensor([-2.0]), torch.tensor([3.0])) == 0).all()


def test_roi_align_exact_on_ramp_and_differs_from_roi_pool():
    h = w = 16
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    feats = (xx + 2 * yy)[None, None].repeat(2, 1, 1, 1)  # (2, 1, H, W)
    rois = torch.tensor([[1.0, 2.3, 3.1, 10.7, 9.9], [0, 4.0, 4.0, 12.0, 12.0]])
    out = detect.roi_align(feats, rois, output_size=2, spatial_scale=1.0, sampling_ratio=2)
    assert out.shape == (2, 1, 2, 2)
    # bin centres: the mean of bilinear samples of a linear map is the map at the bin centre
    x0, y0, x1, y1 = rois[0, 1:]
    cx = x0 + (x1 - x0) * torch.tensor([0.25, 0.75])
    cy = y0 + (y1 - y0) * torch.tensor([0.25, 0.75])
    torch.testing.assert_close(out[0, 0], cx[None, :] + 2 * cy[:, None])
    pooled = detect.roi_pool(feats, rois, output_size=2)
    assert pooled.shape == (2, 1, 2, 2) and not torch.allclose(pooled[0], out[0], atol=0.1)
    many = rois.repeat(2100, 1)  # 4200 RoIs: processed in chunks, same values
    torch.testing.assert_close(detect.roi_align(feats, many, 2)[-2:], out)
    half = detect.roi_align(feats, rois, 2, spatial_scale=0.5)
    assert half.shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        detect.roi_align(feats, rois[:, :4], 2)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        detect.roi_pool(feats[0], rois, 2)
    # the RoI [4, 12] x [4, 12] is whole cells: average pooling of a ramp is exact there, max pooling is biased up
    averaged = detect.roi_pool(feats, rois, output_size=2, mode="avg")
    torch.testing.assert_close(averaged[1, 0], out[1, 0])
    torch.testing.assert_close(pooled[1, 0] - averaged[1, 0], torch.full((2, 2), 1.5 * 3))  # (x + 2y): 1.5 px each way
    with pytest.raises(ValueError, match="mode"):
        detect.roi_pool(feats, rois, 2, mode="median")
    with pytest.raises(ValueError, match="output_size"):
        detect.roi_align(feats, rois, 0)


def test_jitter_proposals():
    data = detect.detection_set(5, seed=0)
    rois, targets = detect.jitter_proposals(data.boxes, data.labels, per_image=6, size=32, seed=0)
    assert rois.shape[1] == 5 and len(rois) == len(targets) and targets.min() >= 0 and targets.max() <= 3
    assert (rois[:, 3] > rois[:, 1]).all() and (rois[:, 4] > rois[:, 2]).all()
    assert (targets > 0).any() and (targets == 0).any()
    crops = detect.roi_align(torch.rand(5, 3, 8, 8), rois, 4, spatial_scale=0.25)
    assert crops.shape == (len(rois), 3, 4, 4)
    assert len(detect.detection_set(3, size=48, seed=0)) == 3


# ----------------------------------------------------------------------------- Faster R-CNN pieces and COCO mAP


def test_encode_decode_hand_values_and_inverse():
    anchor = torch.tensor([[0.0, 0, 10, 20]])  # centre (5, 10), size 10 x 20
    gt = torch.tensor([[2.0, 4, 22, 24]])  # centre (12, 14), size 20 x 20
    deltas = detect.encode_boxes(anchor, gt)
    torch.testing.assert_close(deltas, torch.tensor([[0.7, 0.2, torch.log(torch.tensor(2.0)).item(), 0.0]]))
    torch.testing.assert_close(detect.decode_boxes(anchor, deltas), gt)
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(50, 2, generator=g) * 20
    ref = torch.cat([lo, lo + 1 + torch.rand(50, 2, generator=g) * 10], 1)
    lo = torch.rand(50, 2, generator=g) * 20
    tgt = torch.cat([lo, lo + 1 + torch.rand(50, 2, generator=g) * 10], 1)
    torch.testing.assert_close(detect.decode_boxes(ref, detect.encode_boxes(ref, tgt)), tgt)
    d = torch.randn(50, 4, generator=g)
    torch.testing.assert_close(detect.encode_boxes(ref, detect.decode_boxes(ref, d)), d, atol=1e-4, rtol=1e-4)
    # invariant to a common shift and scale of both boxes
    torch.testing.assert_close(detect.encode_boxes(3 * ref + 7, 3 * tgt + 7), detect.encode_boxes(ref, tgt))


def test_encode_decode_errors():
    with pytest.raises(ValueError, match="must match"):
        detect.encode_boxes(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="positive width"):
        detect.encode_boxes(torch.tensor([[0.0, 0, 0, 1]]), torch.tensor([[0.0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="shape of reference"):
        detect.decode_boxes(torch.ones(2, 4), torch.zeros(2, 3))
    huge = detect.decode_boxes(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[0.0, 0, 100, 100]]))
    assert torch.isfinite(huge).all()  # the log-scale clamp keeps exp finite


def test_make_anchors_layout():
    anchors = detect.make_anchors((2, 3), stride=4, sizes=(4.0, 8.0), ratios=(0.25, 1.0))
    assert anchors.shape == (2 * 3 * 4, 4)
    # cell (0, 0), size 4, ratio 1/4: w = 8, h = 2 around (2, 2)
    torch.testing.assert_close(anchors[0], torch.tensor([-2.0, 1, 6, 3]))
    # cell (1, 2) is the last: centre (10, 6); its last anchor is size 8, ratio 1
    torch.testing.assert_close(anchors[-1], torch.tensor([6.0, 2, 14, 10]))
    torch.testing.assert_close(detect.box_area(anchors)[:4], torch.tensor([16.0, 16, 64, 64]))
    with pytest.raises(ValueError, match="positive"):
        detect.make_anchors((2, 2), 4, sizes=(4.0, -1.0))
    with pytest.raises(ValueError, match="non-empty"):
        detect.make_anchors((0, 2), 4, sizes=(4.0,))


def test_match_anchors_hand_case():
    anchors = torch.tensor(
        [
            [0.0, 0, 10, 10],  # IoU 1 with gt 0: positive
            [0, 0, 10, 8],  # IoU 0.8 with gt 0: positive
            [0, 0, 10, 5],  # IoU 0.5: ignored
            [30, 30, 40, 40],  # IoU 0: negative
            [20, 0, 26, 10],  # IoU 0.6 with gt 1, its best anchor: positive by the second rule
            [20, 0, 22, 10],  # IoU 0.2 with gt 1: negative
        ]
    )
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]])
    labels, matched = detect.match_anchors(anchors, gt)
    assert labels.tolist() == [1, 1, -1, 0, 1, 0]
    assert matched[[0, 1, 4]].tolist() == [0, 0, 1]
    labels, _ = detect.match_anchors(anchors, torch.zeros(0, 4))
    assert labels.tolist() == [0] * 6
    with pytest.raises(ValueError, match="negative <= positive"):
        detect.match_anchors(anchors, gt, positive=0.3, negative=0.7)


def test_rpn_head_shapes_loss_and_proposals():
    anchors = detect.make_anchors((4, 4), 4, sizes=(6.0, 10.0), ratios=(0.5, 1.0, 2.0))
    gt = [torch.tensor([[2.0, 2, 10, 10]]), torch.tensor([[4.0, 6, 12, 14], [0, 0, 6, 6]])]
    labels, deltas = detect.rpn_targets(anchors, gt)
    assert labels.shape == (2, 96) and deltas.shape == (2, 96, 4)
    assert ((labels == 1).sum(1) >= torch.tensor([1, 2])).all()  # every object has an anchor
    torch.testing.assert_close(detect.decode_boxes(anchors[labels[0] == 1], deltas[0][labels[0] == 1])[0], gt[0][0])
    head = detect.RPNHead(channels=8, num_anchors=6, hidden=16)
    obj, d = head(torch.randn(2, 8, 4, 4))
    assert obj.shape == (2, 96) and d.shape == (2, 96, 4)
    loss = detect.rpn_loss(obj, d, labels, deltas)
    loss.backward()
    assert loss.item() > 0 and head.objectness.weight.grad is not None
    # a perfect RPN (huge logits on positives, exact deltas) gives its ground truth back as the top proposal
    perfect = torch.where(labels == 1, 20.0, -20.0)
    boxes, scores = detect.rpn_proposals(perfect, deltas, anchors, size=16, post_nms=5)
    assert len(boxes) == 2 and len(boxes[0]) <= 5
    assert detect.proposal_recall(boxes, gt, 0.99) == 1.0
    with pytest.raises(ValueError, match="disagree"):
        detect.rpn_loss(obj, d, labels[:, :10], deltas)
    with pytest.raises(ValueError, match="disagree"):
        detect.rpn_proposals(obj, d, anchors[:10], size=16)
    with pytest.raises(ValueError, match="num_anchors"):
        detect.RPNHead(channels=8, num_anchors=0)


def test_proposal_targets_and_box_head():
    rois = torch.tensor([[0.0, 0, 0, 10, 10], [0, 1, 1, 11, 11], [0, 20, 20, 25, 25], [1, 0, 0, 4, 4]])
    gt_boxes = [torch.tensor([[0.0, 0, 10, 10]]), torch.zeros(0, 4)]
    gt_labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.long)]
    classes, deltas = detect.proposal_targets(rois, gt_boxes, gt_labels)
    assert classes.tolist() == [2, 2, 0, 0]
    torch.testing.assert_close(deltas[1], torch.tensor([-0.1, -0.1, 0.0, 0.0]))
    assert (deltas[[0, 2, 3]] == 0).all()
    head = detect.RoIBoxHead(channels=3, output_size=2, hidden=8)
    logits, d = head(torch.randn(4, 3, 2, 2))
    assert logits.shape == (4, 4) and d.shape == (4, 4)
    loss = detect.box_head_step(head, (torch.randn(4, 3, 2, 2), classes, deltas))
    assert loss.item() > 0
    feats = torch.randn(2, 3, 4, 4)
    boxes, scores, labels = detect.two_stage_detect(head, feats, [rois[:3, 1:], rois[3:, 1:]], 16, 1 / 4)
    assert len(boxes) == 2 and all(len(b) == len(s) == len(lab) for b, s, lab in zip(boxes, scores, labels))
    unrefined, _, _ = detect.two_stage_detect(head, feats, [rois[:3, 1:], rois[3:, 1:]], 16, 1 / 4, refine=False)
    assert all(any((u == r).all() for r in rois[:, 1:]) for u in unrefined[0])  # boxes stay proposals
    with pytest.raises(ValueError, match="RoI features"):
        head(torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="one proposal tensor per image"):
        detect.two_stage_detect(head, feats, [rois[:, 1:]], 16, 1 / 4)
    x = detect.roi_align(feats, rois, 2, 1 / 4)
    again = detect.two_stage_detect(head, feats, [rois[:3, 1:], rois[3:, 1:]], 16, 1 / 4, roi_features=x)
    assert all(torch.equal(a, b) for a, b in zip(again[0], boxes))  # precomputed crops give the same detections
    with pytest.raises(ValueError, match="rows"):
        detect.two_stage_detect(head, feats, [rois[:3, 1:], rois[3:, 1:]], 16, 1 / 4, roi_features=x[:2])
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        detect.proposal_targets(rois[:, 1:], gt_boxes, gt_labels)


def test_sample_proposals_fixed_fraction_and_caps():
    near = [[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 5, 5]]  # IoUs 1, 0.68, 0.25 with the object
    props = [
        torch.tensor([*near, [20, 20, 30, 30], [21, 21, 31, 31], [22, 20, 32, 30]]),
        torch.tensor([[0.0, 0, 4, 4], [8, 8, 12, 12]]),
    ]
    gt_boxes = [torch.tensor([[0.0, 0, 10, 10]]), torch.zeros(0, 4)]  # IoUs 1, 0.68, 0.25, 0, 0, 0; image 2: no object
    gt_labels = [torch.tensor([3]), torch.zeros(0, dtype=torch.long)]
    g = torch.Generator().manual_seed(0)
    rois, classes, deltas = detect.sample_proposals(props, gt_boxes, gt_labels, 4, fg_fraction=0.5, generator=g)
    assert rois[:, 0].tolist() == [0, 0, 0, 0, 1, 1]  # image 2 has only its 2 background proposals
    assert classes.tolist() == [3, 3, 0, 0, 0, 0]
    assert (detect.box_iou(rois[2:4, 1:], gt_boxes[0]) < 0.5).all() and (deltas[2:] == 0).all()
    torch.testing.assert_close(detect.decode_boxes(rois[:2, 1:], deltas[:2]), gt_boxes[0].expand(2, 4))
    # the foreground cap: 3 candidates (2 proposals + the object itself) for 6 foreground slots
    rois, classes, _ = detect.sample_proposals(props[:1], gt_boxes[:1], gt_labels[:1], per_image=8, fg_fraction=0.75)
    assert classes.tolist() == [3, 3, 3, 0, 0, 0, 0]
    rois, classes, _ = detect.sample_proposals(props[:1], gt_boxes[:1], gt_labels[:1], per_image=8, add_gt=False)
    assert (classes > 0).sum() == 2 and len(rois) == 6
    narrow, _, _ = detect.sample_proposals(props[:1], gt_boxes[:1], gt_labels[:1], 8, 0.5, bg_iou=(0.1, 0.5))
    # 2 foreground proposals + the object, and the one background candidate with IoU in [0.1, 0.5)
    assert len(narrow) == 4
    again = detect.sample_proposals(props, gt_boxes, gt_labels, generator=torch.Generator().manual_seed(1))
    same = detect.sample_proposals(props, gt_boxes, gt_labels, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(again, same))  # seeded
    with pytest.raises(ValueError, match="one proposal, box and label tensor per image"):
        detect.sample_proposals(props[:1], gt_boxes, gt_labels)
    with pytest.raises(ValueError, match="fg_fraction"):
        detect.sample_proposals(props, gt_boxes, gt_labels, fg_fraction=1.5)
    with pytest.raises(ValueError, match="bg_iou"):
        detect.sample_proposals(props, gt_boxes, gt_labels, bg_iou=(0.0, 0.6))
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        detect.sample_proposals([props[0][:, :3]], gt_boxes[:1], gt_labels[:1])


def test_coco_ap_101_points_hand_case():
    # TP, FP, FP, TP, TP with 4 objects: envelope 1 up to R = 1/4, 3/5 up to R = 3/4, 0 beyond
    tp, scores = torch.tensor([1, 0, 0, 1, 1]).bool(), torch.linspace(1.0, 0.1, 5)
    expected = (26 * 1.0 + 50 * 0.6) / 101  # r = 0..0.25 (26 levels) and r = 0.26..0.75 (50 levels)
    assert abs(detect.average_precision(tp, scores, 4, recall_points=101) - expected) < 1e-12
    assert detect.average_precision(tp[:0], scores[:0], 4, recall_points=101) == 0.0
    assert detect.average_precision(torch.tensor([False, True]), torch.tensor([0.9, 0.8]), 1, recall_points=101) == 0.5
    with pytest.raises(ValueError, match="recall_points"):
        detect.average_precision(tp, scores, 4, recall_points=1)


def test_coco_map_perfect_and_iou_06():
    gt_boxes = [torch.tensor([[0.0, 0, 5, 1], [10, 10, 20, 20]]), torch.tensor([[3.0, 3, 8, 8]])]
    gt_labels = [torch.tensor([1, 2]), torch.tensor([1])]
    scores = [torch.tensor([0.9, 0.8]), torch.tensor([0.7])]
    perfect = detect.coco_map(gt_boxes, scores, gt_labels, gt_boxes, gt_labels)
    assert perfect["map"] == 1.0 and len(perfect["per_iou"]) == 10
    # every box with IoU exactly 0.6 (3/5 of its width kept): a true positive at 0.50, 0.55, 0.60 only
    shrunk = [torch.tensor([[0.0, 0, 3, 1], [10, 10, 16, 20]]), torch.tensor([[3.0, 3, 6, 8]])]
    result = detect.coco_map(shrunk, scores, gt_labels, gt_boxes, gt_labels)
    assert abs(result["map"] - 0.3) < 1e-12
    assert [v for v in result["per_iou"].values()] == [1.0] * 3 + [0.0] * 7
    with pytest.raises(ValueError, match="iou_thresholds"):
        detect.coco_map(shrunk, scores, gt_labels, gt_boxes, gt_labels, iou_thresholds=())


def test_coco_rule_lets_a_duplicate_find_a_second_object():
    gt = torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10]])  # two overlapping objects (IoU 2/3)
    dets = torch.tensor([[1.0, 0, 11, 10], [1, 0, 11, 10]])  # two duplicates, each with IoU 0.82 to both objects
    scores = torch.tensor([0.9, 0.8])
    assert detect.match_detections(dets, scores, gt, 0.5, rule="voc").tolist() == [True, False]
    assert detect.match_detections(dets, scores, gt, 0.5, rule="coco").tolist() == [True, True]
    with pytest.raises(ValueError, match="rule"):
        detect.match_detections(dets, scores, gt, 0.5, rule="kitti")


def test_proposal_recall():
    props = [torch.tensor([[0.0, 0, 10, 10]]), torch.zeros(0, 4)]
    gt = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([[0.0, 0, 4, 4]])]
    assert detect.proposal_recall(props, gt) == 1 / 3
    with pytest.raises(ValueError, match="one proposal tensor per image"):
        detect.proposal_recall(props[:1], gt)


def test_coco_map_is_the_mean_of_per_threshold_maps():
    g = torch.Generator().manual_seed(4)
    gt_boxes, gt_labels, boxes, scores, labels = [], [], [], [], []
    for _ in range(6):
        lo = torch.rand(3, 2, generator=g) * 20
        gt = torch.cat([lo, lo + 4 + torch.rand(3, 2, generator=g) * 6], 1)
        gt_boxes.append(gt)
        gt_labels.append(torch.randint(1, 3, (3,), generator=g))
        noisy = gt.repeat(3, 1) + torch.randn(9, 4, generator=g)  # three noisy copies of each object
        boxes.append(noisy)
        scores.append(torch.rand(9, generator=g))
        labels.append(gt_labels[-1].repeat(3))
    result = detect.coco_map(boxes, scores, labels, gt_boxes, gt_labels)
    for t, value in result["per_iou"].items():
        ref = detect.mean_average_precision(boxes, scores, labels, gt_boxes, gt_labels, t, "coco", 101)["map"]
        assert abs(value - ref) < 1e-12
    values = list(result["per_iou"].values())
    assert values[0] > values[-1] and all(a >= b for a, b in zip(values, values[1:]))  # stricter never scores higher
    assert abs(result["map"] - sum(values) / 10) < 1e-12
