"""Evaluation: detections -> COCO results JSON -> pycocotools bbox and segm AP [impl 13, 16.2].

    coco_eval.py   instances_to_coco (xywh boxes with w = x2 - x1, RLE masks, original category ids),
                   evaluate (the 12 COCO numbers + per-category AP per IoU type), and the printed
                   summaries: pycocotools' 12 lines, a per-category table, a one-line JSON
    submission.py  the zips COCO's evaluation server takes (test-dev, no public ground truth)
"""
