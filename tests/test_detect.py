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


def test_proposals_and_head():
    data = detect.detection_set(5, seed=0)
    rois, targets = detect.jitter_proposals(data.boxes, data.labels, per_image=6, size=32, seed=0)
    assert rois.shape[1] == 5 and len(rois) == len(targets) and targets.min() >= 0 and targets.max() <= 3
    assert (rois[:, 3] > rois[:, 1]).all() and (rois[:, 4] > rois[:, 2]).all()
    assert (targets > 0).any() and (targets == 0).any()
    head = detect.RoIHead(channels=3, output_size=4)
    logits = head(detect.roi_align(torch.rand(5, 3, 8, 8), rois, 4, spatial_scale=0.25))
    assert logits.shape == (len(rois), 4)
    assert len(detect.detection_set(3, size=48, seed=0)) == 3
