"""ssl3d.estimate: FLOPs and memory of a step as counted, the stage estimate, its CLI and per-job resources."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from ssl3d import estimate
from ssl3d.cli import main
from ssl3d.plan import finetune_runs, load_config, pretrain_runs

CHECKOUT = Path(__file__).resolve().parents[1]
MICRO = CHECKOUT / "config" / "experiments" / "micro.yaml"
DEVICE = "cpu-2core"  # the committed benchmark of benchmarks/results


@pytest.fixture(scope="module")
def micro():
    return load_config(MICRO)


def test_a_conv3d_step_is_counted_as_analytically():
    """Forward 2·B·Cout·Cin·k³ per output voxel, backward the weight gradient alone (the input needs none); memory:
    weights, their gradients, SGD's momentum and the input the convolution saves."""
    batch, c_in, c_out, side = 2, 3, 4, 8
    with torch.device("meta"):
        conv = torch.nn.Conv3d(c_in, c_out, kernel_size=3, padding=1, bias=False)
    image = torch.empty(batch, c_in, side, side, side, device="meta")
    cost = estimate.count_step(conv, image, lambda x: conv(x).sum(), {"name": "sgd", "lr": 0.1, "momentum": 0.9})
    forward = 2 * batch * c_out * side**3 * c_in * 27
    assert cost.flops == 2 * forward
    assert cost.state_bytes == 3 * conv.weight.nbytes
    assert cost.activation_bytes == image.nbytes
    assert cost.counted == "meta"


def test_the_cpu_fallback_counts_what_meta_counts(micro):
    """A convolutional arm counted on the CPU at batch 1 and scaled to its batch: the same FLOPs as on meta."""
    spec = next(iter(finetune_runs(micro).values()))["spec"]
    arm = estimate.run_arm("finetune", spec)
    on_cpu = estimate.count_on_cpu(arm, "test")
    assert on_cpu.flops == pytest.approx(estimate.step_cost(arm).flops, rel=1e-6)
    assert on_cpu.counted.startswith("counted on the CPU at 32x32x16 x1, scaled x2")


def test_micro_estimate_is_positive_and_linear_in_steps(micro):
    def hours(config):
        rows = estimate.estimate(config, DEVICE)
        return {stage: sum(row.device_hours for row in rows if row.stage == stage)
                for stage in ("pretrain", "finetune")}

    base = hours(micro)
    assert all(math.isfinite(value) and value > 0 for value in base.values()), base
    doubled = copy.deepcopy(micro)
    doubled["pretrain"]["steps"] *= 2
    doubled["finetune"]["steps"] *= 2
    assert hours(doubled) == pytest.approx({stage: 2 * value for stage, value in base.items()}, rel=1e-9)


def test_an_unknown_device_class_names_the_measured_ones(micro):
    with pytest.raises(ValueError, match=f"no benchmark of 'tpu-v9'; measured classes: .*{DEVICE}"):
        estimate.estimate(micro, "tpu-v9")


def test_cli_prints_both_stages_of_the_demo(capsys):
    assert main(["estimate", "--configfile", str(CHECKOUT / "config" / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"device class {DEVICE}" in out
    for line in ("pretrain:", "  pretrain total", "finetune:", "  finetune total", "total"):
        assert any(row.startswith(line) for row in out.splitlines()), line


def test_job_resources_are_ints_at_or_above_their_floors(micro):
    entry = next(iter(pretrain_runs(micro).values()))
    resources = estimate.job_resources("pretrain", entry, DEVICE)
    assert set(resources) == {"mem_mb", "runtime"}
    assert all(isinstance(value, int) for value in resources.values())
    assert resources["mem_mb"] >= estimate.MEM_FLOOR_MB and resources["runtime"] >= estimate.RUNTIME_FLOOR_MIN
    long = {**entry, "spec": {**entry["spec"], "steps": 10**7}}
    assert estimate.job_resources("pretrain", long, DEVICE)["runtime"] > estimate.RUNTIME_FLOOR_MIN
