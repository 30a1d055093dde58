import math

import pytest

from tasks import boxes


@pytest.mark.parametrize("size", [(640, 480), (1, 1), (333, 1000), (1000, 7)])
def test_round_trip_within_half_a_bin_for_boxes_touching_every_edge(size):
    w, h = size
    cases = [[0, 0, w, h], [0, 0, 0, 0], [w, h, w, h], [0, h / 3, w / 2, h], [w * 0.123, 0, w, h * 0.77]]
    for box in cases:
        text = boxes.box_to_tokens(box, w, h)
        assert len(boxes.parse_loc_bins(text)) == 4
        back = boxes.tokens_to_box(text, w, h)
        for v, b, length in zip(box, back, (w, h, w, h), strict=True):
            assert abs(v - b) <= 0.5 * length / boxes.DEFAULT_NUM_BINS + 1e-9


def test_quantisation_formula_and_bin_centre():
    # bin = min(floor(v * B), B - 1); centre = (bin + 0.5) / B  (DESIGN.md §3)
    assert boxes.box_to_tokens([0, 0, 100, 50], 100, 50) == "<loc_0><loc_0><loc_999><loc_999>"
    assert boxes.box_to_tokens([12.34, 5.0, 50, 25], 100, 50) == "<loc_123><loc_100><loc_500><loc_500>"
    assert boxes.tokens_to_box("<loc_0><loc_0><loc_999><loc_999>", 1000, 100) == [0.5, 0.05, 999.5, 99.95]
    assert boxes.box_to_tokens([0, 0, 10, 10], 10, 10, num_bins=4) == "<loc_0><loc_0><loc_3><loc_3>"


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([10, 0, 5, 5], "x1 <= x2"),
        ([0, 10, 5, 5], "x1 <= x2"),
        ([-1, 0, 5, 5], "outside"),
        ([0, 0, 101, 5], "outside"),
        ([0, 0, 5, 51], "outside"),
        ([0, math.nan, 5, 5], "finite"),
        ([0, 0, math.inf, 5], "finite"),
        ([0, 0, 5], "four numbers"),
        (["a", 0, 5, 5], "four numbers"),
    ],
)
def test_degenerate_boxes_raise_clear_errors(box, message):
    with pytest.raises(boxes.BoxError, match=message):
        boxes.box_to_tokens(box, 100, 50)


def test_tokens_to_box_needs_exactly_four():
    with pytest.raises(boxes.BoxError, match="exactly four"):
        boxes.tokens_to_box("<loc_1><loc_2><loc_3>", 10, 10)
    with pytest.raises(boxes.BoxError, match="outside"):
        boxes.tokens_to_box("<loc_1><loc_2><loc_3><loc_1000>", 10, 10)


def test_iou():
    assert boxes.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert boxes.iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0
    assert boxes.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert boxes.iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    assert boxes.box_union([[0, 5, 2, 6], [1, 0, 3, 4]]) == [0, 0, 3, 6]
