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


def test_a_step_is_a_fixed_part_plus_flops_at_a_rate_through_the_two_measured_points():
    """A method timed at its paper arm (10 GFLOP in 1.1 s) and its demo arm (1 GFLOP in 0.2 s): 0.1 s + 10 GFLOP/s,
    which meets both; one timed at one size takes the others' fixed part, and fine-tuning the medians."""
    benchmark = {"device_class": "test", "methods": {
        "two": {"flops_per_step": 10e9, "seconds_per_step": 1.1, "small": {"flops_per_step": 1e9,
                                                                         "seconds_per_step": 0.2}},
        "one": {"flops_per_step": 30e9, "seconds_per_step": 1.1}}}
    fixed, rate = estimate.step_time_model(benchmark, "two")
    assert fixed == pytest.approx(0.1) and rate == pytest.approx(10e9)
    assert estimate.step_time_model(benchmark, "one") == pytest.approx((0.1, 30e9))
    assert estimate.step_time_model(benchmark, None) == pytest.approx((0.1, 20e9))
    faster_small = {"methods": {"m": {"flops_per_step": 10e9, "seconds_per_step": 1.0,
                                      "small": {"flops_per_step": 1e9, "seconds_per_step": 0.05}}}}
    assert estimate.step_time_model(faster_small, "m") == pytest.approx((0.0, 10e9))  # never a negative fixed part


def test_cli_prints_both_stages_of_the_demo(capsys):
    assert main(["estimate", "--configfile", str(CHECKOUT / "config" / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"device class {DEVICE}" in out
    for line in ("pretrain:", "  pretrain total", "finetune:", "  finetune total", "total"):
        assert any(row.startswith(line) for row in out.splitlines()), line


def test_cli_estimates_the_demo_when_no_config_is_named(capsys, monkeypatch):
    monkeypatch.chdir(CHECKOUT)
    assert main(["estimate"]) == 0
    assert "pretrain total" in capsys.readouterr().out


def test_job_resources_are_ints_at_or_above_their_floors(micro):
    entry = next(iter(pretrain_runs(micro).values()))
    resources = estimate.job_resources("pretrain", entry, DEVICE)
    assert set(resources) == {"mem_mb", "runtime"}
    assert all(isinstance(value, int) for value in resources.values())
    assert resources["mem_mb"] >= estimate.MEM_FLOOR_MB and resources["runtime"] >= estimate.RUNTIME_FLOOR_MIN
    long = {**entry, "spec": {**entry["spec"], "steps": 10**7}}
    assert estimate.job_resources("pretrain", long, DEVICE)["runtime"] > estimate.RUNTIME_FLOOR_MIN
    compiled = {**long, "spec": {**long["spec"], "method_config": {**long["spec"]["method_config"], "compile": True}}}
    assert (estimate.job_resources("pretrain", compiled, DEVICE)["runtime"]
            - estimate.job_resources("pretrain", long, DEVICE)["runtime"]) == estimate.COMPILE_MIN
