"""Files in and out (scnet/utils/files.py): weights and checkpoint files never run code (a pickle whose
unpickling would write a marker file goes through every path that reads one, and each stops with one
line naming the file, while the files this codebase and MMDetection write still load); a write that
fails (full disk) says what and where, leaves no partial file and never touches the previous one."""
import errno
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import scnet
from scnet.engine.checkpoint import load_checkpoint, resolve_resume
from scnet.utils.files import FileError, UnsafeFileError, load_file, save_file

from conftest import ROOT, TINY, shapes_dataset, tiny_model


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
    return shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=2, num_val=2)


def _script(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _data(root):
    return [f"data.root={root}", "data.train_annotations=annotations/instances_train.json", "data.train_images=train",
            "data.train_stuff_maps=stuffthingmaps/train", "data.val_annotations=annotations/instances_val.json",
            "data.val_images=val", "data.num_workers=0", "model.semantic.num_classes=183", "train.eval_period=0",
            "solver.max_iters=1"]


def test_scripts_refuse_with_one_line(evil, marker, tmp_path, data_root):
    """eval.py, demo.py, convert_mmdet.py, iou_distribution.py --weights; train.py --resume PATH,
    model.backbone.pretrained=PATH and train.init_weights=PATH."""
    overrides = TINY + _data(data_root)
    runs = {
        "eval.py": ["--weights", str(evil), *overrides],
        "demo.py": [os.path.join(data_root, "val"), "--weights", str(evil), "--out", str(tmp_path / "d"), *overrides],
        "convert_mmdet.py": [str(evil), str(tmp_path / "converted.pth")],
        "iou_distribution.py": ["--weights", str(evil), "--out", str(tmp_path / "iou"), *overrides],
        "train.py": ["--resume", str(evil), "--output-dir", str(tmp_path / "t1"), *overrides],
        "train.py pretrained": ["--output-dir", str(tmp_path / "t2"), *overrides,
                                f"model.backbone.pretrained={evil}"],
        "train.py init_weights": ["--output-dir", str(tmp_path / "t3"), *overrides, f"train.init_weights={evil}"],
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


def test_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    """A disk that fills up during torch.save (torch reports it as a RuntimeError): one line naming the
    file and the cause; the previous file intact; no .tmp left."""
    path = tmp_path / "checkpoint_00000002.pth"
    save_file({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def fills_the_disk(obj, f):
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 3576384 vs 3576272")

    monkeypatch.setattr(torch, "save", fills_the_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    with pytest.raises(FileError, match=rf"cannot write {path}: the disk is full \(0 bytes free in {tmp_path}\)"):
        save_file({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]

    def no_space(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(FileError, match="the disk is full"):
        save_file({}, tmp_path / "other.pth")
    assert os.listdir(tmp_path) == [path.name]


def _limit_file_size(limit):
    def apply():  # in the child: writes past ``limit`` bytes fail (EFBIG) instead of raising SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_training_stops_with_one_line_when_a_checkpoint_cannot_be_written(tmp_path, data_root):
    """train.py whose files may not grow past 1 MB (a checkpoint is ~4 MB): the checkpoint of iteration 2
    fails; the message names it, the checkpoint of iteration 1 is untouched, and a resume continues."""
    out = tmp_path / "run"
    args = ["--output-dir", str(out), *TINY, *_data(data_root)[:-1], "solver.images_per_gpu=1",
            "train.checkpoint_period=1"]
    first = _script("train.py", *args, "solver.max_iters=1")
    assert first.returncode == 0, first.stderr[-2000:]
    good = (out / "checkpoint_00000001.pth").read_bytes()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--resume", "auto", *args, "solver.max_iters=2"]
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, preexec_fn=_limit_file_size(1 << 20))
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert lines[-1].startswith(f"error: cannot write {out / 'checkpoint_00000002.pth'}: "), lines[-3:]
    assert lines[-1].endswith("; nothing was replaced")
    assert (out / "checkpoint_00000001.pth").read_bytes() == good
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    resumed = _script("train.py", "--resume", "auto", *args, "solver.max_iters=2")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    assert load_checkpoint(str(out / "checkpoint_00000002.pth"))["iteration"] == 2


def test_one_run_per_output_folder_and_the_lock_dies_with_its_run(tmp_path, data_root):
    out = tmp_path / "run"
    args = ["--output-dir", str(out), *TINY, *_data(data_root)[:-1], "solver.epochs=50", "train.log_period=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        config = (out / "config.yaml").read_text()
        second = _script("train.py", *args, "solver.base_lr=0.5")
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
        message = second.stderr.strip().splitlines()[-1]
        assert message.startswith(f"error: {out} is the output folder of a run that is still going (pid {first.pid} ")
        assert (out / "config.yaml").read_text() == config  # the second run wrote nothing
    finally:
        first.kill()  # SIGKILL: no clean-up code runs
        first.wait()
    third = _script("train.py", "--resume", "auto", *args, "solver.max_iters=1")
    assert third.returncode == 0, third.stderr[-2000:]


def test_non_finite_weights_are_named_at_load(tmp_path, data_root):
    state = tiny_model().state_dict()
    key = next(k for k in state if k.startswith("roi_heads.box_heads.2.") and k.endswith("weight"))
    state[key].view(-1)[3] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save({"model": state}, path)
    with pytest.raises(FileError, match=rf"{path}: NaN/Inf values in {key}$"):
        scnet.build_model(None, overrides=TINY, weights=str(path))
    result = _script("eval.py", "--weights", str(path), *TINY, *_data(data_root))
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == f"error: {path}: NaN/Inf values in {key}"
    torch.save({"model": state, "optimizer": {}, "epoch": 0, "iteration": 1, "batch_in_epoch": 1, "config": {}}, path)
    with pytest.raises(FileError, match=rf"{path}: NaN/Inf values in {key}$"):
        load_checkpoint(str(path))


def test_resume_into_a_run_of_another_model_names_the_settings(tmp_path, data_root):
    out = tmp_path / "run"
    args = ["--output-dir", str(out), *TINY, *_data(data_root)]
    assert _script("train.py", *args).returncode == 0
    other = _script("train.py", "--resume", "auto", *args, "model.fpn.out_channels=8")
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 1 and "Traceback" not in other.stderr, other.stderr[-2000:]
    assert lines[-1].startswith(f"error: {out / 'checkpoint_00000001.pth'} does not fit this model (")
    assert "model.fpn.out_channels=16 there, 8 here" in lines[-1] and len(lines[-1]) < 800


def test_train_reports_a_dataset_error_in_one_line(tmp_path, data_root):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [], "annotations": [], "categories": "none"}')
    result = _script("train.py", "--output-dir", str(tmp_path / "out"), *TINY, *_data(data_root),
                     f"data.train_annotations={broken}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {broken}: ")


def test_a_run_that_cannot_write_its_folder_says_so_in_one_line(tmp_path, data_root):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--output-dir", str(out), *TINY, *_data(data_root)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(1000),
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot write in {out}: File too large"
