"""Unit tests for max-IoU assignment and random positive/negative sampling [impl 5.3, 9.4, 24.10].

Assignment convention: -1 ignored, 0 negative, k + 1 matched to GT k.
"""
import subprocess
import sys

import pytest
import torch

from scnet.modeling.sampling import assign_boxes, assign_by_iou, sample_positive_negative
from scnet.ops.boxes import box_iou

RPN = (0.7, 0.3, 0.3)  # positive_iou, negative_iou, min_positive_iou


def test_assign_rpn_setting_hand_matrix():
    """3 GTs x 9 candidates, RPN thresholds 0.7 / 0.3 / 0.3."""
    iou = torch.tensor(
        [
            # c0    c1    c2    c3    c4    c5    c6   c7    c8    c9
            [0.10, 0.50, 0.80, 0.20, 0.00, 0.00, 0.0, 0.29, 0.30, 0.72],  # GT0, best 0.80 (c2)
            [0.05, 0.20, 0.75, 0.90, 0.10, 0.10, 0.0, 0.00, 0.00, 0.85],  # GT1, best 0.90 (c3)
            [0.00, 0.10, 0.00, 0.00, 0.40, 0.40, 0.0, 0.00, 0.00, 0.00],  # GT2, best 0.40 (c4 and c5 tie)
        ]
    )
    assigned = assign_by_iou(iou, *RPN)
    assert assigned.dtype == torch.int64 and assigned.shape == (10,)
    # c0: max 0.10 < 0.3 -> negative 0
    # c1: max 0.50 in [0.3, 0.7) -> ignored -1 (GT0's best is 0.80, not 0.50, so no low-quality claim)
    # c2: max 0.80 >= 0.7 -> GT0 (argmax, GT1 has only 0.75) -> 1
    # c3: 0.90 -> GT1 -> 2
    # c4, c5: max 0.40 would be ignored, but GT2's best IoU 0.40 >= 0.3 -> low-quality, both ties -> 3
    # c6: all 0 -> negative 0
    # c7: 0.29 < 0.3 -> 0;  c8: exactly 0.3 is not < 0.3 -> ignored -1
    # c9: max 0.85 (GT1; GT0 also >= 0.7 with 0.72) -> argmax GT1 -> 2 (no GT has its best here)
    assert assigned.tolist() == [0, -1, 1, 2, 3, 3, 0, 0, -1, 2]


def test_assign_low_quality_claims_even_otherwise_negative_or_positive_candidates():
    """A GT's best IoU claims every candidate tying with it, overriding what thresholds said:
    GT0's best is 0.25 < neg 0.3 but min_positive_iou is 0.2 -> c0 and c2 (both 0.25) go to GT0, though
    0.25 alone would be negative; c1 matches GT1 at 0.9 (positive)."""
    iou = torch.tensor(
        [
            [0.25, 0.10, 0.25, 0.05],
            [0.00, 0.90, 0.00, 0.00],
        ]
    )
    assigned = assign_by_iou(iou, 0.7, 0.3, 0.2)
    # c3: 0.05 -> 0
    assert assigned.tolist() == [1, 2, 1, 0]


def test_assign_low_quality_later_gt_wins_ties():
    """GT0 and GT1 both have their best IoU 0.6 on c0: the positive argmax would pick GT0, but the
    low-quality loop runs in GT order and GT1 overwrites -> c0 -> 2. c1 (only GT0's, 0.6) -> 1."""
    iou = torch.tensor(
        [
            [0.60, 0.60, 0.10],
            [0.60, 0.20, 0.10],
        ]
    )
    assert assign_by_iou(iou, *RPN).tolist() == [2, 1, 0]
    # the same with the cascade setting 0.5 / 0.5 / 0.5 (0.6 is positive, argmax GT0, then GT1 overwrites)
    assert assign_by_iou(iou, 0.5, 0.5, 0.5).tolist() == [2, 1, 0]


def test_assign_low_quality_overrides_a_positive_match_to_another_gt():
    """gt_max_assign_all: c0 has 0.8 with GT0 (positive) but GT1's best is 0.5 at c0 -> GT1 claims it."""
    iou = torch.tensor(
        [
            [0.80, 0.75],
            [0.50, 0.00],
        ]
    )
    # c1: 0.75 -> GT0 (positive); c0 -> GT1 via low-quality (later and explicit)
    assert assign_by_iou(iou, *RPN).tolist() == [2, 1]


def test_assign_min_positive_iou_blocks_weak_low_quality_matches():
    """GT2 best 0.4 < min_positive_iou 0.5: no claim, c4/c5 stay ignored; GT0 best 0.55 >= 0.5 claims c1."""
    iou = torch.tensor(
        [
            [0.10, 0.55, 0.00, 0.00, 0.00, 0.00],
            [0.00, 0.00, 0.95, 0.00, 0.00, 0.00],
            [0.00, 0.00, 0.00, 0.00, 0.40, 0.40],
        ]
    )
    assert assign_by_iou(iou, 0.7, 0.3, 0.5).tolist() == [0, 1, 2, 0, -1, -1]
    # with the RPN min 0.3 both c4 and c5 are claimed by GT2
    assert assign_by_iou(iou, *RPN).tolist() == [0, 1, 2, 0, 3, 3]


def test_assign_low_quality_off():
    """low_quality=False: only the thresholds apply."""
    iou = torch.tensor([[0.40, 0.10, 0.80, 0.71], [0.00, 0.20, 0.75, 0.90]])
    # c0: 0.40 ignored (no low-quality claim); c1: 0.20 -> 0; c2: argmax GT0 (0.80) -> 1; c3: GT1 -> 2
    assert assign_by_iou(iou, *RPN, low_quality=False).tolist() == [-1, 0, 1, 2]
    assert assign_by_iou(torch.tensor([[0.40, 0.10, 0.50]]), *RPN).tolist() == [-1, 0, 1]  # 0.5 is GT0's best


def test_assign_cascade_stage_thresholds_have_no_ignore_band():
    """pos = neg = min_pos = 0.6 (stage 2): every candidate is 0 or positive."""
    iou = torch.tensor([[0.59, 0.60, 0.65, 0.0], [0.0, 0.0, 0.70, 0.3]])
    # c0: 0.59 < 0.6 -> 0; c1: 0.6 -> GT0; c2: argmax GT1 (0.70); c3: 0.3 -> 0
    assert assign_by_iou(iou, 0.6, 0.6, 0.6).tolist() == [0, 1, 2, 0]


def test_assign_no_gt_everything_negative():
    """No GT: every candidate is negative (0)."""
    out = assign_by_iou(torch.zeros((0, 5)), *RPN)
    assert out.dtype == torch.int64 and out.tolist() == [0, 0, 0, 0, 0]


def test_assign_no_candidates():
    """No candidates -> empty."""
    assert assign_by_iou(torch.zeros((3, 0)), *RPN).shape == (0,)


# ------------------------------------------------------------------------------------------- sampling


def _assigned(num_pos, num_neg, num_ignored=0, pos_first=True):
    parts = [torch.ones(num_pos, dtype=torch.long), torch.zeros(num_neg, dtype=torch.long)]
    if not pos_first:
        parts.reverse()
    return torch.cat(parts + [torch.full((num_ignored,), -1, dtype=torch.long)])


def test_sample_caps_positives_and_fills_with_negatives():
    """100 positives, 300 negatives, 20 ignored; batch 64, fraction 0.25 -> 16 positives + 48 negatives,
    sorted ascending, unique, from the right pools, never the ignored ones."""
    torch.manual_seed(0)
    assigned = _assigned(100, 300, 20)
    pos, neg = sample_positive_negative(assigned, 64, 0.25)
    assert pos.numel() == 16 and neg.numel() == 48
    assert (assigned[pos] > 0).all() and (assigned[neg] == 0).all()
    for idx in (pos, neg):
        assert idx.tolist() == sorted(set(idx.tolist()))


def test_sample_few_positives_negatives_fill_the_rest():
    """5 positives, 1000 negatives; batch 64, fraction 0.5 -> all 5 positives + 59 negatives."""
    torch.manual_seed(0)
    assigned = _assigned(1000, 0) * 0
    assigned[[3, 500, 999, 10, 42]] = torch.tensor([2, 1, 3, 1, 1])
    pos, neg = sample_positive_negative(assigned, 64, 0.5)
    assert pos.tolist() == [3, 10, 42, 500, 999]
    assert neg.numel() == 59 and (assigned[neg] == 0).all()
    assert neg.tolist() == sorted(set(neg.tolist()))


def test_sample_fewer_candidates_than_requested_returns_all():
    """3 positives, 4 negatives, 2 ignored, batch 256: everything except the ignored, sorted."""
    assigned = torch.tensor([0, 1, -1, 0, 2, 0, -1, 0, 1])
    pos, neg = sample_positive_negative(assigned, 256, 0.5)
    assert pos.tolist() == [1, 4, 8]
    assert neg.tolist() == [0, 3, 5, 7]


def test_sample_negatives_unbounded_by_positive_count():
    """No positives at all: the whole batch is negatives (neg_pos_ub = -1)."""
    torch.manual_seed(0)
    pos, neg = sample_positive_negative(torch.zeros(500, dtype=torch.long), 256, 0.5)
    assert pos.numel() == 0 and neg.numel() == 256


def test_sample_quota_uses_int_of_batch_times_fraction():
    """RoI-head setting: 512 * 0.25 = 128 positives at most, then 384 negatives."""
    torch.manual_seed(0)
    pos, neg = sample_positive_negative(_assigned(300, 1000), 512, 0.25)
    assert pos.numel() == 128 and neg.numel() == 384


def test_sample_is_reproducible_with_fixed_seed_and_random_otherwise():
    """Same seed -> same indices; the subset is random (not the first k), so other seeds differ."""
    assigned = _assigned(200, 400, pos_first=False)  # negatives 0..399, positives 400..599
    torch.manual_seed(123)
    a = sample_positive_negative(assigned, 64, 0.25)
    torch.manual_seed(123)
    b = sample_positive_negative(assigned, 64, 0.25)
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    torch.manual_seed(7)
    c = sample_positive_negative(assigned, 64, 0.25)
    assert a[0].tolist() != c[0].tolist() or a[1].tolist() != c[1].tolist()
    assert a[0].tolist() != list(range(400, 416))  # not simply the first 16 positives


def test_sample_gt_rows_prepended_come_first_among_positives():
    """With the G = 3 GTs prepended as candidates 0..2 (each assigned to itself) and positives under the
    quota, the positives start with 0, 1, 2 even though other positives come first in no particular order."""
    torch.manual_seed(0)
    proposals_assigned = torch.zeros(200, dtype=torch.long)
    proposals_assigned[[150, 7, 90, 33]] = torch.tensor([1, 3, 2, 2])
    assigned = torch.cat([torch.tensor([1, 2, 3]), proposals_assigned])
    pos, neg = sample_positive_negative(assigned, 64, 0.25)
    # 7 positives <= 16: all kept, sorted -> GT rows 0, 1, 2 then proposals 7, 33, 90, 150 (+3 offset)
    assert pos.tolist() == [0, 1, 2, 10, 36, 93, 153]
    assert neg.numel() == 57 and neg.min() >= 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_gt_rows_first_when_positives_are_subsampled(seed):
    """Over the quota, whichever GT rows (indices < G) survive the random pick form a prefix of the positives."""
    torch.manual_seed(seed)
    g = 10
    assigned = torch.cat([torch.arange(1, g + 1), torch.ones(50, dtype=torch.long), torch.zeros(100, dtype=torch.long)])
    pos, _ = sample_positive_negative(assigned, 32, 0.5)
    assert pos.numel() == 16
    is_gt = (pos < g).tolist()
    assert is_gt == sorted(is_gt, reverse=True)


@pytest.mark.parametrize("num_gt, max_elements", [(37, 500), (200, 3000), (5, 10 ** 9)])
def test_chunked_assignment_equals_the_full_matrix(num_gt, max_elements):
    """Integer boxes on a small grid: many exact IoU ties between GTs, for the max and the claims."""
    g = torch.Generator().manual_seed(num_gt)
    def boxes(n):
        xy = torch.randint(0, 40, (n, 2), generator=g).float()
        return torch.cat([xy, xy + torch.randint(1, 20, (n, 2), generator=g).float()], dim=1)
    gt, candidates = boxes(num_gt), boxes(400)
    gt[1] = gt[0]  # a duplicate GT: identical rows
    for args in [RPN, (0.5, 0.5, 0.5), (0.7, 0.3, 0.0)]:
        for low_quality in (True, False):
            full = assign_by_iou(box_iou(gt, candidates), *args, low_quality=low_quality)
            chunked = assign_boxes(gt, candidates, *args, low_quality=low_quality, max_elements=max_elements)
            assert torch.equal(full, chunked), (args, low_quality)
    assert torch.equal(assign_boxes(gt[:0], candidates, *RPN), torch.zeros(400, dtype=torch.long))


def test_assignment_memory_is_bounded_with_a_thousand_boxes():
    """1,000 GT boxes against all anchors of an 800x1333 image (~270,000): the extra peak memory of the
    assignment stays under 600 MB (measured: 357 MB; the whole matrix with box_iou's intermediates took
    9.2 GB, and 3x the time)."""
    code = """
import resource, torch
from scnet.modeling.rpn import AnchorGenerator
from scnet.modeling.sampling import assign_boxes
torch.set_num_threads(1)
generator = AnchorGenerator()
sizes = [(200, 334), (100, 167), (50, 84), (25, 42), (13, 21)]  # P2-P6 of 800x1333
anchors = torch.cat([generator.grid_anchors(level, h, w, "cpu") for level, (h, w) in enumerate(sizes)])
xy = torch.rand(1000, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([1200.0, 700.0])
gt = torch.cat([xy, xy + 10 + torch.rand(1000, 2, generator=torch.Generator().manual_seed(1)) * 120], dim=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assigned = assign_boxes(gt, anchors, 0.7, 0.3, 0.3)
print(anchors.shape[0], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, int((assigned > 0).sum()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    num_anchors, extra_mb, positives = (int(v) for v in out.stdout.split())
    assert num_anchors > 250_000 and positives > 1000
    assert extra_mb < 600, extra_mb
