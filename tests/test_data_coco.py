"""CocoDataset [impl 16.1, 16.3, 24.22, 24.28]: real COCO images, a generated dataset with every bad
input, image decoding, semantic targets through the model, and the synthetic generator."""
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image, ImageFile
from pycocotools.coco import COCO

from scnet.data.checks import LoadError, annotation_problem, box_partly_outside, decode_image
from scnet.data.coco import CocoDataset, instance_semantic_map
from scnet.data.synthetic import STUFF_IDS, make_synthetic_coco
from scnet.ops.image_list import pad_to

from bad_inputs import BAD_INPUTS, inject_bad_inputs
from conftest import ROOT, tiny_model

SAMPLE = os.environ.get("SCNET_COCO_SAMPLE", os.path.join(ROOT, "..", "shared", "data", "coco_train2017_sample"))
needs_sample = pytest.mark.skipif(
    not os.path.isdir(SAMPLE), reason=f"real COCO sample not found at {SAMPLE} (set SCNET_COCO_SAMPLE)"
)


def _paths(root, split="train"):
    return (os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split),
            os.path.join(root, "stuffthingmaps", split))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A clean generated dataset of 12 images with stuff maps."""
    root = str(tmp_path_factory.mktemp("shapes"))
    make_synthetic_coco(root, 12, seed=3)
    return root


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A generated dataset with every bad input of BAD_INPUTS, and {kind: file} of where each is."""
    root = str(tmp_path_factory.mktemp("bad"))
    make_synthetic_coco(root, len(BAD_INPUTS) + 3, seed=1)
    return root, inject_bad_inputs(root)


# --- real COCO images ------------------------------------------------------------------------------
def _sample_subset(annotation_file, image_dir, count=40):
    """Indices of every grayscale image and every image with crowd annotations, then the first others."""
    data = json.load(open(annotation_file))
    crowd = {a["image_id"] for a in data["annotations"] if a["iscrowd"]}
    gray = {i["file_name"] for i in data["images"] if Image.open(os.path.join(image_dir, i["file_name"])).mode != "RGB"}
    return crowd, gray


@needs_sample
def test_real_coco_sample_loads_end_to_end():
    annotation_file = os.path.join(SAMPLE, "annotations", "instances_train2017.json")
    image_dir = os.path.join(SAMPLE, "train2017")
    dataset = CocoDataset(annotation_file, image_dir, semantic_source="instances", num_semantic_classes=81)
    assert len(dataset) == 292 and dataset.category_ids[:3] == [1, 2, 3] and len(dataset.class_names) == 80
    assert sorted(reason for _, reason in dataset.skipped) == ["no annotations", "no annotations"]
    crowd_ids, gray_files = _sample_subset(annotation_file, image_dir)
    assert gray_files and len(crowd_ids) == 22
    names = zip(dataset.image_ids, dataset.file_names)
    special = [i for i, (image_id, name) in enumerate(names) if image_id in crowd_ids or name in gray_files]
    others = [i for i in range(len(dataset)) if i not in special]
    crowd_pixels = 0
    for n, i in enumerate(special + others[: 40 - len(special)]):
        image, target = dataset[(i, n % 2 == 1)]
        h, w = image.shape[-2:]
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and max(h, w) <= 1333 and min(h, w) <= 800
        assert max(h, w) == 1333 or min(h, w) == 800
        boxes, masks, labels = target["boxes"], target["masks"], target["labels"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and masks.dtype == torch.uint8
        assert masks.shape == (len(boxes), h, w) and target["semantic_seg"].shape == (h, w)
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) > 0).all()
        assert labels.min() >= 0 and labels.max() < 80
        assert target["flipped"] == (n % 2 == 1) and not target["issues"]
        _assert_masks_inside_boxes(masks, boxes)
        values = set(target["semantic_seg"].unique().tolist())
        assert values <= set(labels.tolist()) | {80, 255}
        crowd_pixels += int((target["semantic_seg"] == 255).sum()) if dataset.image_ids[i] in crowd_ids else 0
    assert crowd_pixels > 0  # crowd regions are ignored in the instance-derived semantic map


def _assert_masks_inside_boxes(masks, boxes, margin=2):
    """Boxes and masks went through the same geometry: (almost) every mask pixel lies in its box."""
    for mask, box in zip(masks, boxes):
        ys, xs = mask.nonzero(as_tuple=True)
        if len(xs) == 0:
            continue
        inside = (xs >= box[0] - margin) & (xs < box[2] + margin) & (ys >= box[1] - margin) & (ys < box[3] + margin)
        assert inside.float().mean() > 0.99


@needs_sample
def test_real_coco_sample_eval_mode_keeps_original_images():
    annotation_file = os.path.join(SAMPLE, "annotations", "instances_train2017.json")
    dataset = CocoDataset(annotation_file, os.path.join(SAMPLE, "train2017"), semantic_source="none", training=False)
    assert len(dataset) == 294 and dataset.skipped == []  # images without annotations are kept
    i = dataset.file_names.index("000000000250.jpg")
    image, target = dataset[(i, True)]
    expected = np.array(Image.open(os.path.join(SAMPLE, "train2017", "000000000250.jpg")).convert("RGB"))
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
    assert target["boxes"].shape == (0, 4) and "semantic_seg" not in target
    assert target["flipped"] is False and target["scale_factor"] == (1.0, 1.0)
    assert target["original_size"] == tuple(expected.shape[:2])


# --- every bad input ---------------------------------------------------------------------------------
def test_bad_inputs_are_skipped_fixed_or_replaced(bad):
    root, files = bad
    annotation_file, image_dir, stuff_dir = _paths(root)
    dataset = CocoDataset(annotation_file, image_dir, stuff_dir=stuff_dir, train_scale=(200, 150))
    skipped = {}
    for file_name, reason in dataset.skipped:
        skipped.setdefault(file_name, []).append(reason)
    assert set(skipped) == {f for k, f in files.items() if BAD_INPUTS[k] in ("image skipped", "annotation skipped")}
    for kind, action in BAD_INPUTS.items():
        if action in ("image skipped", "annotation skipped"):
            assert [r for r in skipped[files[kind]] if r.startswith(kind)], (kind, skipped[files[kind]])
        if action == "image skipped":
            assert files[kind] not in dataset.file_names
        if action == "annotation skipped":  # the image stays, without the broken annotation
            assert files[kind] in dataset.file_names
    issues = {}
    for i in range(len(dataset)):
        image, target = dataset[i]
        assert target["file_name"] not in [files[k] for k, a in BAD_INPUTS.items() if a == "replaced"]
        assert target["masks"].shape[-2:] == image.shape[-2:] == target["semantic_seg"].shape
        assert set(target["semantic_seg"].unique().tolist()) <= set(STUFF_IDS) | {1, 4, 7, 255}
        for issue in target["issues"]:
            issues.setdefault(issue.split(":")[0], []).append(issue)
    expected_issue = {
        "corrupt image": "unreadable image",
        "truncated image": "truncated",
        "size differs from the JSON": "image size differs from the JSON",
        "stuff map of the wrong size": "stuff map size differs from the image",
        "RGB stuff map, different channels": "RGB stuff map with different channels",
        "RGB stuff map, equal channels": "RGB stuff map: mode RGB with equal channels",
        "stuff labels out of range": "stuff labels out of range",
        "box partly outside the image": "box partly outside the image",
    }
    for kind, text in expected_issue.items():
        found = issues.get(files[kind], [])
        outcome = "replaced by" if BAD_INPUTS[kind] == "replaced" else "used after fix"
        assert [s for s in found if text in s and outcome in s], (kind, found)


def test_fixed_inputs_hold_the_fixed_values(bad):
    root, files = bad
    annotation_file, image_dir, stuff_dir = _paths(root)
    dataset = CocoDataset(annotation_file, image_dir, stuff_dir=stuff_dir, training=False)
    _, target = dataset[dataset.file_names.index(files["stuff labels out of range"])]
    assert (target["semantic_seg"][5:15, 5:15] == 255).all()
    _, target = dataset[dataset.file_names.index(files["box partly outside the image"])]
    assert target["boxes"][-1].tolist() == [0.0, 4.0, 20.0, 16.0]  # bbox [-4, 4, 24, 12] clipped
    # evaluation keeps the images without (usable) annotations but still drops missing files
    assert files["no annotations"] in dataset.file_names and files["crowd-only"] in dataset.file_names
    assert files["missing image file"] not in dataset.file_names


def test_unusable_run_of_images_raises(tmp_path):
    make_synthetic_coco(str(tmp_path), 3, seed=0)
    annotation_file, image_dir, stuff_dir = _paths(str(tmp_path))
    for name in os.listdir(image_dir):
        open(os.path.join(image_dir, name), "wb").write(b"garbage")
    dataset = CocoDataset(annotation_file, image_dir, stuff_dir=stuff_dir)
    with pytest.raises(RuntimeError, match="no usable image among 3 .*000001.jpg: unreadable image"):
        dataset[1]


def test_construction_errors(tmp_path, shapes):
    annotation_file, image_dir, stuff_dir = _paths(shapes)
    with pytest.raises(ValueError, match="does not exist.*data.semantic_source=instances.*semantic.enabled=false"):
        CocoDataset(annotation_file, image_dir, stuff_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="holds no PNG"):
        CocoDataset(annotation_file, image_dir, stuff_dir=str(tmp_path))
    with pytest.raises(ValueError, match="model.semantic.num_classes >= model.num_classes \\+ 1"):
        CocoDataset(annotation_file, image_dir, semantic_source="instances", num_semantic_classes=3)
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="malformed JSON"):
        CocoDataset(str(tmp_path / "broken.json"), image_dir, semantic_source="none")
    with pytest.raises(ValueError, match="no usable image .*missing image file"):
        CocoDataset(annotation_file, str(tmp_path), semantic_source="none")


@pytest.mark.parametrize(
    "change, kind",
    [
        ({}, None),
        ({"bbox": [1, 2, 3]}, "malformed box"),
        ({"category_id": 4}, "unknown category"),
        ({"ignore": 1}, "ignore flag"),
        ({"bbox": [1, 1, 5, 0.9]}, "degenerate box"),
        ({"area": 0}, "non-positive area"),
        ({"bbox": [-30, 1, 20, 5]}, "box outside the image"),
        ({"bbox": [1, 20, 5, 5]}, "box outside the image"),  # starts on the bottom edge (H = 20)
        ({"segmentation": []}, "empty segmentation"),
        ({"segmentation": [[1, 1, 2, 2], [3, 3, 4, 4]]}, "polygon with fewer than 3 points"),
        ({"segmentation": [[1, 1, 2, 2], [1, 1, 9, 1, 9, 9]]}, None),  # the short polygon is just dropped
        ({"segmentation": {"size": [10, 30], "counts": "PP5"}}, "RLE size differs from the image"),
        ({"segmentation": {"size": [20, 30], "counts": [100, 500]}}, None),  # uncompressed RLE
        ({"segmentation": {"size": [20, 30], "counts": [100, 50]}}, "malformed segmentation"),
        ({"segmentation": {"size": [20, 30], "counts": "0"}}, "malformed segmentation"),  # runs miss pixels
        ({"segmentation": "polygon"}, "malformed segmentation"),
    ],
)
def test_annotation_rules(change, kind):
    ann = dict({"bbox": [1, 1, 5, 5], "category_id": 3, "area": 25.0, "segmentation": [[1, 1, 6, 1, 6, 6]]}, **change)
    problem = annotation_problem(ann, 20, 30, {3: 0})  # a 30 x 20 image, category 3 -> label 0
    assert (problem[0] if problem else None) == kind


def test_odd_polygon_and_a_file_listed_twice_are_reported(tmp_path, shapes):
    """pycocotools would drop an odd polygon's last number, and a file listed under two ids would be
    trained on twice, both silently: each is now fixed or skipped with its reason."""
    annotation_file, image_dir, stuff_dir = _paths(shapes)
    with open(annotation_file) as f:
        data = json.load(f)
    first, second = data["images"][:2]
    odd = next(a for a in data["annotations"] if a["image_id"] == first["id"])
    x, y, w, h = odd["bbox"]
    odd["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h, x]]  # 9 numbers
    twice = dict(first, id=max(i["id"] for i in data["images"]) + 1)
    data["images"].append(twice)
    data["annotations"].append(dict(odd, id=10 ** 6, image_id=twice["id"]))
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    dataset = CocoDataset(str(path), image_dir, stuff_dir=stuff_dir)
    reasons = {}
    for file, reason in dataset.skipped:
        reasons.setdefault(reason, []).append(file)
    odd_reason = next(r for r in reasons if r.startswith("odd-length polygon"))
    assert reasons[odd_reason] == [first["file_name"]] and "the last one dropped" in odd_reason
    twice_reason = next(r for r in reasons if r.startswith("image file listed twice"))
    assert reasons[twice_reason] == [first["file_name"]] and f"entry id {twice['id']}" in twice_reason
    assert not any("unknown image id" in r for r in reasons)  # its annotations went with the entry
    assert len(dataset) == len(data["images"]) - 1 and second["file_name"] in [r["file_name"] for r in dataset._records]


def test_compressed_rle_is_checked_against_the_image_size():
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[3:9, 4:20] = 1
    counts = mask_util.encode(np.asfortranarray(mask))["counts"].decode()
    ann = {"bbox": [4, 3, 16, 6], "category_id": 3, "segmentation": {"size": [20, 30], "counts": counts}}
    assert annotation_problem(ann, 20, 30, {3: 0}) is None
    assert box_partly_outside([-1, 0, 5, 5], 20, 30) and not box_partly_outside([0, 0, 30, 20], 20, 30)


# --- decoding ---------------------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high
    pixels[:6, :6] = (255, 0, 0)  # red at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    image, notes = decode_image(str(tmp_path / "rotated.jpg"))
    assert image.shape == (40, 20, 3)
    assert image[:4, -4:, 0].min() > 200 and image[:4, :4, 0].max() < 50  # top-left went to top-right
    assert ("EXIF orientation", "tag 6 applied") in notes


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 77, (77, 77, 77)),
        ("LA", (77, 10), (77, 77, 77)),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha dropped, as cv2 does
        ("P", 3, (9, 8, 7)),
        ("I;16", 0x1234, (0x12, 0x12, 0x12)),  # 16 -> 8 bits by scaling (not clipped to 255)
        ("I;16", 1000, (3, 3, 3)),
    ],
)
def test_decode_modes_to_rgb_uint8(tmp_path, mode, value, expected):
    image = Image.new(mode, (7, 5), value)
    if mode == "P":
        image.putpalette([0, 0, 0] * 3 + [9, 8, 7] + [0, 0, 0] * 252)
    image.save(tmp_path / "image.png")
    assert Image.open(tmp_path / "image.png").mode == mode
    array, notes = decode_image(str(tmp_path / "image.png"))
    assert array.dtype == np.uint8 and array.shape == (5, 7, 3)
    assert (array == np.array(expected, dtype=np.uint8)).all()
    assert bool(notes) == (mode != "RGB")


def test_decode_cmyk_and_truncated(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    array, _ = decode_image(str(tmp_path / "cmyk.jpg"))
    assert array.shape == (6, 8, 3) and array[..., 0].min() > 200 and array[..., 1:].max() < 60  # red
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3)).astype(np.uint8)
    for name in ("full.png", "full.jpg"):
        Image.fromarray(noise).save(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        (tmp_path / ("cut_" + name)).write_bytes(data[: len(data) // 2])
        with pytest.raises(LoadError, match="truncated"):
            decode_image(str(tmp_path / ("cut_" + name)))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- semantic targets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pad_value", [0, 255])
def test_stuff_map_semantic_target_through_the_model(shapes, pad_value):
    annotation_file, image_dir, stuff_dir = _paths(shapes)
    dataset = CocoDataset(annotation_file, image_dir, stuff_dir=stuff_dir, train_scale=(203, 141))
    model = tiny_model(f"model.semantic.pad_value={pad_value}")
    for i, flip in ((0, False), (1, True)):
        image, target = dataset[(i, flip)]
        h, w = image.shape[-2:]
        stuff = np.array(Image.open(os.path.join(stuff_dir, dataset.file_names[i].replace(".jpg", ".png"))))
        rows = np.floor(np.arange(h) * stuff.shape[0] / h).astype(int)  # legacy nearest, independently
        cols = np.floor(np.arange(w) * stuff.shape[1] / w).astype(int)
        expected = torch.from_numpy(stuff[rows][:, cols])
        assert torch.equal(target["semantic_seg"], expected.flip(-1) if flip else expected)
        padded_size = (-(-h // 32) * 32, -(-w // 32) * 32)
        out = model.context.semantic_target([target], padded_size)
        assert out.shape == (1, padded_size[0] // 8, padded_size[1] // 8)
        full = pad_to([target["semantic_seg"].long()], padded_size, pad_value)[0]
        assert torch.equal(out[0], full[::8, ::8])  # pixels (8i, 8j) of the resized, padded map
        padded_rows, padded_cols = torch.arange(out.shape[1]) * 8 >= h, torch.arange(out.shape[2]) * 8 >= w
        assert padded_rows.any() or padded_cols.any()  # the short side 141 is padded to 160
        assert (out[0, padded_rows] == pad_value).all() and (out[0, :, padded_cols] == pad_value).all()


def test_instance_semantic_map_labels_background_and_crowd(shapes):
    annotation_file, image_dir, _ = _paths(shapes)
    dataset = CocoDataset(annotation_file, image_dir, semantic_source="instances", num_semantic_classes=4,
                          training=False)
    coco = COCO(annotation_file)
    seen_crowd = False
    for i in range(len(dataset)):
        _, target = dataset[i]
        expected = np.full(target["semantic_seg"].shape, 3, dtype=np.uint8)  # background = C = 3
        anns = coco.loadAnns(coco.getAnnIds(imgIds=dataset.image_ids[i]))
        for ann in anns:
            if ann["iscrowd"]:
                expected[coco.annToMask(ann) > 0] = 255
                seen_crowd = True
        for mask, label in zip(target["masks"].numpy(), target["labels"].tolist()):
            expected[mask > 0] = label
        assert np.array_equal(target["semantic_seg"].numpy(), expected)
        assert len(target["labels"]) == sum(1 for a in anns if not a["iscrowd"])
    assert seen_crowd


def test_instance_semantic_map_paint_order():
    masks = np.zeros((2, 4, 6), dtype=np.uint8)
    masks[0, :, :3] = 1
    masks[1, :, 2:4] = 1  # later instance over the earlier one in column 2
    crowd = np.zeros((1, 4, 6), dtype=np.uint8)
    crowd[0, :2, :] = 1  # crowd under both instances in the top rows
    expected = np.array([[0, 0, 1, 1, 255, 255]] * 2 + [[0, 0, 1, 1, 3, 3]] * 2, dtype=np.uint8)
    assert np.array_equal(instance_semantic_map(masks, [0, 1], crowd, 3), expected)


# --- the synthetic generator ------------------------------------------------------------------------
def test_synthetic_dataset_is_deterministic_and_valid(tmp_path, shapes):
    first = make_synthetic_coco(str(tmp_path / "a"), 12, seed=3)
    assert open(first).read() == open(_paths(shapes)[0]).read()
    same_image = os.path.join(shapes, "train", "000005.jpg")
    assert (tmp_path / "a" / "train" / "000005.jpg").read_bytes() == open(same_image, "rb").read()
    other = make_synthetic_coco(str(tmp_path / "b"), 12, seed=4)
    assert open(other).read() != open(first).read()
    coco = COCO(first)
    anns = coco.loadAnns(coco.getAnnIds())
    kinds = {("crowd" if a["iscrowd"] else type(a["segmentation"]).__name__) for a in anns}
    assert kinds == {"list", "dict", "crowd"}  # polygons, RLE, crowd
    for ann in anns:
        info = coco.imgs[ann["image_id"]]
        mask = coco.annToMask(ann)
        x, y, w, h = ann["bbox"]
        assert mask.shape == (info["height"], info["width"]) and mask.sum() > 0 and ann["area"] > 0
        assert 0 <= x and 0 <= y and x + w <= info["width"] and y + h <= info["height"]
        assert 1 <= ann["category_id"] <= 90
    stuff = np.array(Image.open(tmp_path / "a" / "stuffthingmaps" / "train" / "000001.png"))
    assert set(np.unique(stuff).tolist()) <= set(STUFF_IDS) | {1, 4, 7, 255} and (stuff[0] == 255).all()


def test_synthetic_dataset_loads_cleanly(shapes):
    annotation_file, image_dir, stuff_dir = _paths(shapes)
    dataset = CocoDataset(annotation_file, image_dir, stuff_dir=stuff_dir, train_scale=(200, 150))
    assert len(dataset) == 12 and dataset.skipped == [] and dataset.category_ids == [2, 5, 8]
    for i in range(len(dataset)):
        image, target = dataset[(i, i % 2 == 0)]
        assert not target["issues"] and len(target["boxes"]) > 0
        _assert_masks_inside_boxes(target["masks"], target["boxes"])
        # the front-most shape (the last annotation) is labelled category_id - 1 in the stuff map,
        # except on the unlabeled border: masks and maps went through the same geometry
        stuff_values = target["semantic_seg"][target["masks"][-1] > 0]
        stuff_values = stuff_values[stuff_values != 255]
        assert len(stuff_values) and (stuff_values == dataset.category_ids[int(target["labels"][-1])] - 1).all()
