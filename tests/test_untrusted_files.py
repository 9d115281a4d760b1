"""Weights and checkpoint files never run code (scnet/utils/files.py): a pickle whose unpickling would write
a marker file goes through every path that reads one, and each stops with one line naming the file,
while the files this codebase and MMDetection write still load."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import scnet
from scnet.data.synthetic import make_synthetic_coco
from scnet.engine.checkpoint import load_checkpoint, resolve_resume
from scnet.utils.files import FileError, UnsafeFileError, load_file

from conftest import ROOT, TINY, tiny_model


class _WritesMarker:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "code from a weights file ran"


@pytest.fixture
def evil(tmp_path, marker):
    """A zip-format .pth (torch.save) whose weights look real, with the payload beside them."""
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_model().state_dict(), "meta": _WritesMarker(marker)}, path)
    return path


def test_payload_runs_with_the_unsafe_reader(tmp_path, evil, marker):
    """The file is a real attack: torch's full unpickler runs it."""
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain_pickle"])
def test_refused_in_every_file_format_with_the_type_named(tmp_path, marker, fmt):
    path = tmp_path / f"{fmt}.pth"
    payload = {"state_dict": {"w": torch.zeros(2)}, "x": _WritesMarker(marker)}
    if fmt == "plain_pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(UnsafeFileError, match=rf"{path}: refused to load: it holds posix\.system"):
        load_file(path)


def test_api_paths_refuse(evil, marker, tmp_path, monkeypatch):
    """build_model(weights=), a file:// URL (through torch.hub's cache), a training checkpoint, the
    backbone's pretrained weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    for weights in (str(evil), f"file://{evil}"):
        with pytest.raises(UnsafeFileError, match="evil.pth"):
            scnet.build_model(None, overrides=TINY, weights=weights)
    with pytest.raises(UnsafeFileError, match="evil.pth"):
        load_checkpoint(str(evil))
    from scnet.modeling.backbone.resnet import load_pretrained

    with pytest.raises(UnsafeFileError, match="evil.pth"):
        load_pretrained(tiny_model().backbone, str(evil))


def test_resume_auto_skips_a_planted_checkpoint_with_a_warning(evil, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.replace(evil, out / "checkpoint_00000099.pth")
    messages = []
    assert resolve_resume("auto", str(out), messages.append) == (None, None)
    assert any("checkpoint_00000099.pth: refused to load" in m for m in messages), messages


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_synthetic_coco(str(root), num_images=2, seed=0, split_name="train")
    make_synthetic_coco(str(root), num_images=2, seed=1, split_name="val")
    return str(root)


def _script(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _data(root):
    return [f"data.root={root}", "data.train_annotations=annotations/instances_train.json", "data.train_images=train",
            "data.train_stuff_maps=stuffthingmaps/train", "data.val_annotations=annotations/instances_val.json",
            "data.val_images=val", "data.num_workers=0", "model.semantic.num_classes=183", "solver.max_iters=1"]


def test_scripts_refuse_with_one_line(evil, marker, tmp_path, data_root):
    """eval.py, demo.py, convert_mmdet.py, iou_distribution.py --weights; train.py --resume PATH and
    model.backbone.pretrained=PATH."""
    overrides = TINY + _data(data_root)
    runs = {
        "eval.py": ["--weights", str(evil), *overrides],
        "demo.py": [os.path.join(data_root, "val"), "--weights", str(evil), "--out", str(tmp_path / "d"), *overrides],
        "convert_mmdet.py": [str(evil), str(tmp_path / "converted.pth")],
        "iou_distribution.py": ["--weights", str(evil), "--out", str(tmp_path / "iou"), *overrides],
        "train.py": ["--resume", str(evil), "--output-dir", str(tmp_path / "t1"), *overrides],
        "train.py pretrained": ["--output-dir", str(tmp_path / "t2"), *overrides,
                                f"model.backbone.pretrained={evil}"],
    }
    for name, args in runs.items():
        result = _script(name.split()[0], *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and lines, (name, result.stdout[-1500:])
        assert "Traceback" not in result.stderr, (name, result.stderr[-3000:])
        assert lines[-1].startswith(f"error: {evil}: refused to load: it holds posix.system"), (name, lines[-3:])


def test_files_we_and_mmdetection_write_still_load(tmp_path):
    """Our training checkpoint (numpy RNG state inside), an MMDetection 2.x file (meta with the config
    text and class names) and an MMEngine 3.x file (a message hub holding HistoryBuffer objects and numpy
    scalars, a type this process does not have): read without running their classes' code."""
    ours = tmp_path / "ours.pth"
    torch.save({"model": {"w": torch.ones(2)}, "rng": [np.random.get_state()], "config": {"a": [1, 2]}}, ours)
    assert torch.equal(load_file(ours)["model"]["w"], torch.ones(2))

    mmdet2 = tmp_path / "mmdet2.pth"
    torch.save({"meta": {"mmdet_version": "2.8.0", "CLASSES": ("person", "car"), "config": "model = dict()",
                         "epoch": 20, "iter": 146560}, "state_dict": {"rpn_head.rpn_conv.weight": torch.ones(1)}},
               mmdet2, _use_new_zipfile_serialization=False)
    assert load_file(mmdet2)["meta"]["CLASSES"] == ("person", "car")

    module = type(sys)("mmengine.logging.history_buffer")
    HistoryBuffer = type("HistoryBuffer", (), {"__module__": module.__name__,
                                               "__init__": lambda self: setattr(self, "_log_history", np.ones(3))})
    module.HistoryBuffer = HistoryBuffer
    packages = {name: type(sys)(name) for name in ("mmengine", "mmengine.logging")}
    sys.modules.update(packages, **{module.__name__: module})
    try:
        mmdet3 = tmp_path / "mmdet3.pth"
        torch.save({"meta": {"seed": np.int64(7), "dataset_meta": {"classes": ("person",)}},
                    "state_dict": {"w": torch.zeros(1)}, "message_hub": {"log_scalars": {"loss": HistoryBuffer()}}},
                   mmdet3)
    finally:
        for name in (*packages, module.__name__):
            del sys.modules[name]
    loaded = load_file(mmdet3)
    assert loaded["meta"]["seed"] == 7 and torch.equal(loaded["state_dict"]["w"], torch.zeros(1))
    assert type(loaded["message_hub"]["log_scalars"]["loss"]).__module__ == "mmengine.logging.history_buffer"


@pytest.mark.parametrize("content, expected", [
    (b"this is a text file, not weights at all..", "damaged or not a PyTorch file"),
    (None, "truncated or not a PyTorch file"),
])
def test_damaged_files_are_named(tmp_path, content, expected):
    path = tmp_path / "bad.pth"
    if content is None:  # the first half of a real checkpoint
        torch.save({"model": tiny_model().state_dict()}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(FileError, match=rf"{path} cannot be read: {expected}"):
        load_file(path)
    with pytest.raises(FileError, match="no such file"):
        load_file(tmp_path / "missing.pth")
