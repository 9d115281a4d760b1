"""--compile: the dense parts compiled in place give the eager model's detections and keep its
parameter names (so checkpoints load either way)."""
import shutil

import pytest
import torch

from conftest import synthetic_sample, tiny_model
from scnet.engine.compile import compile_dense_parts, dense_parts


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on CPU")
def test_compiled_dense_parts_match_eager():
    torch.set_num_threads(2)
    model = tiny_model("model.test.score_thresh=0.0").eval()
    image, _ = synthetic_sample(96, 128, 3, seed=0)
    keys = list(model.state_dict())
    with torch.no_grad():
        eager = model([image])[0]
        compile_dense_parts(model)
        compiled = model([image])[0]
    assert len(dense_parts(model)) == 4  # backbone, neck, RPN head, semantic head
    assert list(model.state_dict()) == keys
    assert torch.equal(eager["labels"], compiled["labels"])
    torch.testing.assert_close(compiled["boxes"], eager["boxes"], atol=1e-2, rtol=0)
    torch.testing.assert_close(compiled["scores"], eager["scores"], atol=1e-4, rtol=0)
