import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from pipeline.core.classes import CLASSES, IGNORE_INDEX
from pipeline.heads.metrics import ConfusionMeter, confusion, scores


def random_split(seed, absent=(3, 5, 16, 17)):
    rng = np.random.default_rng(seed)
    present = [c for c in range(19) if c not in absent]
    labels = [rng.choice(present, size=(24, 40)) for _ in range(5)]
    preds = [rng.choice(present, size=(24, 40)) for _ in range(5)]
    for lab in labels:
        lab[rng.random(lab.shape) < 0.2] = IGNORE_INDEX
    # class 5 only predicted, class 17 only in GT: both IoU 0 and counted in the mean
    preds[0][0, :7] = 5
    labels[1][1, :3] = 17
    preds[1][1, :3] = 0
    return labels, preds


def sklearn_scores(labels, preds):
    y = np.concatenate([lab.ravel() for lab in labels])
    p = np.concatenate([pr.ravel() for pr in preds])
    keep = y != IGNORE_INDEX
    cm = confusion_matrix(y[keep], p[keep], labels=list(range(19)))
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = {CLASSES[c]: (100 * tp[c] / union[c] if union[c] else None) for c in range(19)}
    vals = [v for v in iou.values() if v is not None]
    return cm, iou, float(np.mean(vals)), 100 * tp.sum() / cm.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_sklearn_with_ignore_and_absent_classes(seed):
    labels, preds = random_split(seed)
    meter = ConfusionMeter()
    for lab, pr in zip(labels, preds, strict=True):
        meter.update(pr, lab)
    cm, iou, miou, aacc = sklearn_scores(labels, preds)
    np.testing.assert_array_equal(meter.matrix, cm)
    s = meter.scores()
    assert set(s) == {"mIoU", "aAcc", "IoU"}
    assert list(s["IoU"]) == list(CLASSES)
    for name in CLASSES:
        if iou[name] is None:
            assert s["IoU"][name] is None
        else:
            assert s["IoU"][name] == pytest.approx(iou[name], abs=1e-4)
    # absent from both GT and prediction -> null and out of the mean; pred-only class 5 counts as 0
    assert s["IoU"]["wall"] is None and s["IoU"]["train"] is None
    assert s["IoU"]["pole"] == 0.0 and s["IoU"]["motorcycle"] == 0.0
    assert sum(v is None for v in s["IoU"].values()) == 2
    assert s["mIoU"] == pytest.approx(miou, abs=1e-4)
    assert s["aAcc"] == pytest.approx(aacc, abs=1e-4)


def test_accumulating_batches_equals_one_split_matrix():
    labels, preds = random_split(3)
    whole = confusion(np.stack(preds), np.stack(labels))
    meter = ConfusionMeter()
    for lab, pr in zip(labels, preds, strict=True):
        meter.update(pr, lab)
    np.testing.assert_array_equal(whole, meter.matrix)


def test_perfect_and_empty():
    lab = np.array([[0, 1], [IGNORE_INDEX, 1]])
    s = scores(confusion(lab.clip(0, 18), lab))
    assert s["mIoU"] == 100.0 and s["aAcc"] == 100.0
    assert sum(v is not None for v in s["IoU"].values()) == 2
    empty = scores(np.zeros((19, 19), dtype=np.int64))
    assert empty["mIoU"] is None and empty["aAcc"] is None


def test_bad_ids_are_rejected():
    with pytest.raises(ValueError, match="label ids"):
        confusion(np.zeros((2, 2)), np.full((2, 2), 30))
    with pytest.raises(ValueError, match="pixels"):
        confusion(np.zeros((2, 3)), np.zeros((2, 2)))
