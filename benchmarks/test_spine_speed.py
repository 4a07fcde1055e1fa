"""Per-stage speed of the spine (pytest-benchmark): `pytest benchmarks --benchmark-enable`.

Stages: one phantom case, one case through the demo recipe, one fine-tuning step, sliding-window inference and
metrics on one demo test case.
"""

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from ssl3d.data.phantom import make_phantom
from ssl3d.data.recipes import apply_recipe, get_recipe
from ssl3d.evaluate.metrics import EmptyPolicy, case_metrics
from ssl3d.nets import build_network, predict_volume

BACKBONE = {"name": "unet", "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1}
CLASSES = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "liver", 5: "stomach", 6: "aorta"}


@pytest.fixture(scope="module")
def demo_case():
    image, label, affine = make_phantom(0)
    return apply_recipe(image, affine, get_recipe("demo_ct"), label)


def test_phantom_case(benchmark):
    benchmark(make_phantom, 0)


def test_demo_recipe_case(benchmark):
    image, label, affine = make_phantom(0)
    benchmark(apply_recipe, image, affine, get_recipe("demo_ct"), label)


def test_finetune_step(benchmark):
    torch.set_num_threads(1)
    model = build_network(BACKBONE, 1, 7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    image, label = torch.rand(2, 1, 32, 32, 32), torch.randint(0, 7, (2, 1, 32, 32, 32))

    def step():
        optimizer.zero_grad()
        loss_fn(model(image), label).backward()
        optimizer.step()

    benchmark(step)


def test_inference_and_metrics_case(benchmark, demo_case):
    torch.set_num_threads(1)
    model = build_network(BACKBONE, 1, 7)

    def evaluate():
        pred = predict_volume(model, demo_case["image"][None], (32, 32, 32), 0.25, 4, torch.device("cpu"))
        return case_metrics(pred, demo_case["label"], CLASSES, tuple(demo_case["spacing"]), 2.0, EmptyPolicy())

    rows = benchmark(evaluate)
    assert len(rows) == 24 and all(np.isfinite(r["value"]) for r in rows if r["metric"] != "hd95")
