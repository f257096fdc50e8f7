"""COCO box average precision, in NumPy (no pycocotools).

COCO's definition (cocodataset.org/#detection-eval, as pycocotools computes
it): per class and IoU threshold (0.50, 0.55, ..., 0.95), detections sorted by
score are matched greedily, each to the unmatched ground-truth box it overlaps
most at or above the threshold; precision, made non-increasing, is read at 101
recall points (0, 0.01, ..., 1) and averaged. AP averages over the classes that
have ground truth and the thresholds; AP50 and AP75 are single thresholds.

Left out: COCO's area ranges (small/medium/large: our boxes are in resized
pixels) and crowd regions (the pipelines drop crowd boxes; COCO ignores the
detections that fall on them, so on COCO this reads slightly low).
"""

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100  # per image and class, as COCO's maxDets


def box_iou(boxes, others):
    """IoU matrix of yxyx `boxes` [n, 4] and `others` [m, 4]."""
    boxes, others = np.asarray(boxes, np.float64), np.asarray(others, np.float64)
    top_left = np.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=-1)
    other_area = np.prod(others[:, 2:] - others[:, :2], axis=-1)
    union = area[:, None] + other_area[None, :] - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1e-12), 0.0)


def coco_box_ap(detections, ground_truths):
    """`{"AP", "AP50", "AP75"}` of `detections` against `ground_truths`.

    Both are lists with one entry per image: detections `(boxes [n, 4],
    scores [n], labels [n])`, ground truths `(boxes [m, 4], labels [m])`, yxyx
    boxes in one frame. Each figure is None when no image has ground truth.
    """
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} images of detections for "
                         f"{len(ground_truths)} of ground truth.")
    classes = sorted({int(label) for _, labels in ground_truths for label in labels})
    if not classes:
        return {"AP": None, "AP50": None, "AP75": None}
    precision = np.array([_class_precision(detections, ground_truths, label)
                          for label in classes])  # [classes, thresholds, recall points]
    per_threshold = precision.mean(axis=(0, 2))
    return {"AP": float(per_threshold.mean()), "AP50": float(per_threshold[0]),
            "AP75": float(per_threshold[5])}


def _class_precision(detections, ground_truths, label):
    """Interpolated precision at `RECALL_POINTS` for each IoU threshold."""
    scores, matched = [], []  # per detection; matched: [thresholds] bools
    num_ground_truth = 0
    for (boxes, det_scores, det_labels), (gt_boxes, gt_labels) in zip(detections,
                                                                       ground_truths):
        det_labels, gt_labels = np.asarray(det_labels), np.asarray(gt_labels)
        gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)[gt_labels == label]
        num_ground_truth += len(gt)
        mine = np.flatnonzero(det_labels == label)
        order = mine[np.argsort(-np.asarray(det_scores)[mine], kind="stable")][:MAX_DETECTIONS]
        if not len(order):
            continue
        iou = box_iou(np.asarray(boxes, np.float64).reshape(-1, 4)[order], gt)
        matches = np.stack([_greedy_match(iou, t) for t in IOU_THRESHOLDS], axis=1)
        scores.extend(np.asarray(det_scores)[order])
        matched.extend(matches)
    if not scores:
        return np.zeros((len(IOU_THRESHOLDS), len(RECALL_POINTS)))
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    true_positives = np.cumsum(np.asarray(matched)[order], axis=0)
    false_positives = np.cumsum(~np.asarray(matched)[order], axis=0)
    recall = true_positives / num_ground_truth
    precision = true_positives / (true_positives + false_positives)
    # Non-increasing from the right: the best precision at this recall or more.
    precision = np.maximum.accumulate(precision[::-1], axis=0)[::-1]
    result = np.zeros((len(IOU_THRESHOLDS), len(RECALL_POINTS)))
    for t in range(len(IOU_THRESHOLDS)):
        at = np.searchsorted(recall[:, t], RECALL_POINTS, side="left")
        reached = at < len(recall)
        result[t, reached] = precision[at[reached], t]
    return result


def _greedy_match(iou, threshold):
    """Whether each detection (rows, best score first) matches a ground-truth
    box (columns) not taken by a better one, at IoU >= `threshold`."""
    taken = np.zeros(iou.shape[1], bool)
    matched = np.zeros(iou.shape[0], bool)
    for row in range(iou.shape[0]):
        candidates = np.where(taken, -1.0, iou[row])
        if candidates.size and candidates.max() >= threshold:
            taken[candidates.argmax()] = True
            matched[row] = True
    return matched
