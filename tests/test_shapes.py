import pytest
import torch

from dlarch_lib.shapes import CLASSES, NUM_CLASSES, ShapesSet, make_shapes


def test_shapes_dtypes_and_ranges():
    data = make_shapes(64, size=32, max_shapes=3, seed=1)
    assert isinstance(data, ShapesSet) and len(data) == 64
    assert data.images.shape == (64, 1, 32, 32) and data.images.dtype == torch.float32
    assert data.masks.shape == (64, 32, 32) and data.masks.dtype == torch.int64
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    assert set(data.masks.unique().tolist()) == set(range(NUM_CLASSES)) and NUM_CLASSES == len(CLASSES) + 1
    assert len(data.boxes) == len(data.labels) == 64
    for boxes, labels in zip(data.boxes, data.labels):
        assert boxes.shape == (len(labels), 4) and boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert 1 <= len(labels) <= 3 and labels.min() >= 1 and labels.max() <= 3
    assert torch.isclose(data.class_frequencies().sum(), torch.tensor(1.0))


def test_shapes_are_seeded_and_colour_works():
    a, b, c = make_shapes(20, seed=3), make_shapes(20, seed=3), make_shapes(20, seed=4)
    torch.testing.assert_close(a.images, b.images)
    assert torch.equal(a.masks, b.masks) and all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
    assert not torch.equal(a.masks, c.masks)
    rgb = make_shapes(8, size=24, channels=3, seed=0)
    assert rgb.images.shape == (8, 3, 24, 24) and rgb.masks.shape == (8, 24, 24)


def test_boxes_are_tight_and_cover_every_labelled_pixel():
    data = make_shapes(200, seed=5)
    for mask, boxes, labels in zip(data.masks, data.boxes, data.labels):
        covered = torch.zeros_like(mask, dtype=torch.bool)
        for (x0, y0, x1, y1), label in zip(boxes.long().tolist(), labels.tolist()):
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            crop = mask[y0:y1, x0:x1] == label
            # tight: the object touches all four sides of its box
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
            covered[y0:y1, x0:x1] |= mask[y0:y1, x0:x1] == label
        assert covered[mask > 0].all(), "a labelled pixel lies in no box of its class"


def test_clean_images_separate_shapes_from_background():
    data = make_shapes(50, noise=0.0, texture=0.0, seed=2)
    for image, mask in zip(data.images[:, 0], data.masks):
        background = image[mask == 0]
        assert torch.allclose(background, background[0].expand_as(background))  # one flat level
        assert (image[mask > 0] - background[0]).abs().min() >= 0.25 - 1e-6  # contrast >= 0.25


def test_slicing_and_errors():
    data = make_shapes(10, seed=0)
    part = data[2:5]
    assert len(part) == 3 and torch.equal(part.masks, data.masks[2:5]) and len(part.boxes) == 3
    with pytest.raises(TypeError, match="slice"):
        data[0]
    with pytest.raises(ValueError, match="channels"):
        make_shapes(4, channels=2)
    with pytest.raises(ValueError, match="radius"):
        make_shapes(4, size=16, radius=(3.0, 9.0))
    with pytest.raises(ValueError, match="n >= 1"):
        make_shapes(0)
    with pytest.raises(ValueError, match="noise"):
        make_shapes(4, noise=-0.1)
