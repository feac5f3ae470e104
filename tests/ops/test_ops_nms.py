"""box_iou / nms / batched_nms against plain Python references."""

import pytest
import torch

from res2det.ops import _tv, batched_nms, box_iou, nms
from res2det.ops.nms import _nms_torch

TV_NMS = _tv.nms  # probed kernel, saved before the fixture below disables it


@pytest.fixture(autouse=True)
def pure_torch(monkeypatch):
    monkeypatch.setattr(_tv, "nms", None)


def ref_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_nms(boxes, scores, thr):
    b, s = boxes.tolist(), scores.tolist()
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))  # stable by index
    keep = []
    for i in order:
        if all(ref_iou(b[i], b[j]) <= thr for j in keep):
            keep.append(i)
    return keep


def rand_boxes(n, gen, size=100.0, dtype=torch.float64):
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * size
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * size / 3
    return torch.cat([xy, xy + wh], dim=1)


def test_box_iou_matches_reference_and_zero_area():
    gen = torch.Generator().manual_seed(0)
    a, b = rand_boxes(13, gen), rand_boxes(7, gen)
    a[0, 2:] = a[0, :2]  # zero-area box
    b[1] = a[0]          # two identical zero-area boxes: union 0
    iou = box_iou(a, b)
    assert iou.shape == (13, 7) and not iou.isnan().any()
    ref = torch.tensor([[ref_iou(x, y) for y in b.tolist()] for x in a.tolist()], dtype=torch.float64)
    torch.testing.assert_close(iou, ref, rtol=0, atol=1e-12)
    assert box_iou(a[:0], b).shape == (0, 7)


def test_nms_empty():
    keep = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert keep.dtype == torch.long and keep.shape == (0,)
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("block", [2048, 16])
def test_nms_matches_reference(thr, block):
    gen = torch.Generator().manual_seed(1)
    boxes = rand_boxes(200, gen)
    scores = (torch.rand(200, generator=gen, dtype=torch.float64) * 10).round() / 10  # many ties
    keep = _nms_torch(boxes, scores, thr, block=block)
    assert keep.tolist() == ref_nms(boxes, scores, thr)
    if block == 2048:
        assert nms(boxes, scores, thr).tolist() == keep.tolist()
        assert nms(boxes.float(), scores.float(), thr).tolist() == ref_nms(boxes.float(), scores.float(), thr)


def test_nms_ties_and_strict_threshold():
    boxes = torch.tensor([[0, 0, 2, 1], [0, 0, 1, 1], [0, 0, 2, 1], [5, 5, 6, 6]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.9, 0.9, 0.1])
    # IoU(0, 1) is exactly 0.5: not suppressed at threshold 0.5 (strict ">").
    assert nms(boxes, scores, 0.5).tolist() == [0, 1, 3]  # box 2 duplicates box 0
    assert nms(boxes, scores, 0.49).tolist() == [0, 3]
    # Equal scores: the earlier index wins.
    assert nms(boxes[[2, 0]], scores[:2], 0.5).tolist() == [0]
    assert nms(boxes, torch.tensor([0.1, 0.2, 0.9, 0.3]), 0.5).tolist() == [2, 3, 1]


def test_batched_nms_class_aware():
    gen = torch.Generator().manual_seed(2)
    boxes = rand_boxes(150, gen)
    scores = torch.rand(150, generator=gen, dtype=torch.float64)
    idxs = torch.randint(0, 4, (150,), generator=gen)
    keep = batched_nms(boxes, scores, idxs, 0.4)
    ref = []
    for c in range(4):
        inds = torch.nonzero(idxs == c).flatten()
        ref += [inds[i].item() for i in ref_nms(boxes[inds], scores[inds], 0.4)]
    ref.sort(key=lambda i: (-scores[i].item(), i))
    assert keep.tolist() == ref
    # Per-class loop over the offset boxes equals the single offset-trick call, ties included.
    tied = (scores * 5).round() / 5
    single = batched_nms(boxes, tied, idxs, 0.4, per_class_above=10**9)
    assert batched_nms(boxes, tied, idxs, 0.4, per_class_above=0).tolist() == single.tolist()
    # Identical boxes of different classes never suppress each other.
    same = torch.tensor([[1.0, 1, 5, 5]] * 3)
    assert batched_nms(same, torch.tensor([0.5, 0.7, 0.6]), torch.tensor([0, 1, 0]), 0.5).tolist() == [1, 2]
    # Negative coordinates still keep classes apart.
    neg = torch.tensor([[-50.0, -50, -10, -10], [-50, -50, -10, -10]])
    assert batched_nms(neg, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5).tolist() == [0, 1]


@pytest.mark.skipif(TV_NMS is None, reason="torchvision kernels unavailable")
def test_torchvision_fast_path_agrees(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    boxes = rand_boxes(300, gen, dtype=torch.float32)
    scores = (torch.rand(300, generator=gen) * 10).round()  # ties
    monkeypatch.setattr(_tv, "nms", TV_NMS)
    assert nms(boxes, scores, 0.5).tolist() == _nms_torch(boxes, scores, 0.5).tolist()
