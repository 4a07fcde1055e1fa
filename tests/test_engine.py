"""The one training engine: resume, workers, hooks, non-finite losses; fine-tuning's stopping and selection on it."""

import itertools
import os
import threading

import numpy as np
import pandas as pd
import pytest
import torch

import ssl3d.engine
import ssl3d.finetune.train as train
import ssl3d.pretrain.loop as loop
from ssl3d.data.sampling import SeededSamples
from ssl3d.engine import Engine, NonFiniteLoss, core_left_for_batches, drawn_ahead, to_device
from ssl3d.finetune.train import finetune
from ssl3d.io import read_json
from ssl3d.nets import build_network
from ssl3d.pretrain.transfer import load_pretrained

from conftest import pretrain_config, run_config

STEPS = 6


class Killed(Exception):
    pass


class Points(SeededSamples):
    def sample(self, item, rng):
        x = torch.from_numpy(rng.normal(size=3).astype(np.float32))
        return {"x": x, "y": x.sum(0, keepdim=True) * item}


def engine(out, **kwargs) -> Engine:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / STEPS)
    return Engine("run", model, optimizer, scheduler, out, STEPS, checkpoint_every=2, device=torch.device("cpu"),
                  **kwargs)


def run(engine: Engine, **hooks) -> dict:
    def forward(batch):
        error = (engine.model(batch["x"]) - batch["y"]).square().mean()
        return error, {"mse": error}

    return engine.run(Points([1.0, 2.0], seed=0, length=STEPS * 4), 4, forward, **hooks)


def losses(state: dict) -> list[float]:
    return [row["loss"] for row in state["rows"]]


def test_a_resumed_run_replays_the_same_batches_and_ends_with_the_same_weights(tmp_path):
    straight = engine(tmp_path / "straight")
    run(straight)

    def crash(step, row):
        if step == 5:
            raise Killed  # after the checkpoint of step 4

    with pytest.raises(Killed):
        run(engine(tmp_path / "resumed"), after_step=crash)
    resumed = engine(tmp_path / "resumed")
    assert resumed.resumed_from == 4
    state = run(resumed)
    assert losses(state) == losses(straight.state)
    assert all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(),
                                                 resumed.model.state_dict().values()))
    assert resumed.measurements()["resumed_from_step"] == 4 and straight.measurements()["steps"] == STEPS


def test_workers_and_the_drawing_thread_give_the_same_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(ssl3d.engine, "core_left_for_batches", lambda device: False)
    inline = losses(run(engine(tmp_path / "inline")))
    assert losses(run(engine(tmp_path / "workers", workers=2))) == inline
    monkeypatch.setattr(ssl3d.engine, "core_left_for_batches", lambda device: True)
    assert losses(run(engine(tmp_path / "thread"))) == inline


def test_without_workers_the_next_batch_is_drawn_in_a_thread_while_the_step_runs():
    drawn, threads = [], []
    second = threading.Event()

    def source():
        for k in range(3):
            threads.append(threading.current_thread().name)
            drawn.append(k)
            if k == 1:
                second.set()
            yield k

    batches = drawn_ahead(source())
    assert next(batches) == 0
    assert second.wait(timeout=10)  # drawn while "step 1" runs, before it is asked for
    assert list(batches) == [1, 2] and drawn == [0, 1, 2]
    assert all(name.startswith("batches") for name in threads)


def test_an_error_drawing_a_batch_reaches_the_training_loop():
    def source():
        yield 0
        raise Killed("unreadable case")

    batches = drawn_ahead(source())
    assert next(batches) == 0
    with pytest.raises(Killed, match="unreadable case"):
        next(batches)


def test_batches_are_drawn_ahead_where_torch_leaves_a_core_free_or_on_a_gpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert core_left_for_batches(torch.device("cpu"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not core_left_for_batches(torch.device("cpu"))
    assert core_left_for_batches(torch.device("cuda"))


def test_rows_hooks_and_early_stop(tmp_path):
    updates = []
    state = run(engine(tmp_path, log_every=1), after_update=updates.append, after_step=lambda step, row: step == 3)
    assert updates == [1, 2, 3] and state["stopped_at"] == 3 and len(state["rows"]) == 3
    assert list(state["rows"][0]) == ["step", "loss", "loss_mse", "lr", "data_s", "forward_s", "backward_s",
                                      "peak_memory_mb"]


def test_clipping_bounds_the_gradient(tmp_path):
    clipped = engine(tmp_path, grad_clip=1e-3)
    norms = []
    run(clipped, after_update=lambda step: norms.append(float(torch.cat([p.grad.ravel() for p in
                                                                         clipped.model.parameters()]).norm())))
    assert max(norms) <= 1e-3 * (1 + 1e-5)


def test_a_non_finite_loss_names_the_step_and_terms(tmp_path):
    def forward(batch):
        error = engine_.model(batch["x"]).mean() * (float("nan") if engine_.state["step"] == 2 else 1.0)
        return error, {"mse": error, "other": torch.tensor(0.5)}

    engine_ = engine(tmp_path)
    with pytest.raises(NonFiniteLoss, match=r"step 3: the loss is nan \(loss_mse nan, loss_other 0\.5\)"):
        engine_.run(Points([1.0], seed=0, length=STEPS * 4), 4, forward)


@pytest.fixture
def config(tiny_index, tiny_splits, tmp_path):
    def make(**overrides):
        return run_config(tmp_path / "config.json", tiny_index, tiny_splits, **overrides)
    return make


def test_finetuning_stops_after_patience_validations_without_improvement(config, tmp_path, monkeypatch):
    scores = iter([0.5, 0.6, 0.55, 0.4, 0.7])
    monkeypatch.setattr(train, "mean_foreground_dice", lambda *args: next(scores))
    out = tmp_path / "run"
    saved = torch.load(finetune(config(steps=12, val_every=2, early_stopping={"patience": 2}), out),
                       weights_only=False)
    manifest = read_json(out / "manifest.json")
    assert manifest["stopped_at_step"] == 8 and manifest["selected_step"] == saved["selected_step"] == 4
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["step"]) == list(range(1, 9)) and list(log["val_dice"].dropna()) == [0.5, 0.6, 0.55, 0.4]
    assert {"loss_dice", "loss_ce", "data_s", "forward_s", "backward_s", "peak_memory_mb"} <= set(log.columns)
    assert not (out / "checkpoints" / "last.pt").exists()


def test_finetuning_without_a_selected_validation_writes_no_model(config, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "mean_foreground_dice", lambda *args: float("nan"))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"no validation step was selected \(validation Dice: nan at step 6, nan at "
                                         r"step 12\), so no model.pt was written"):
        finetune(config(), out)
    assert not (out / "model.pt").exists() and not (out / "manifest.json").exists()


def test_a_non_finite_finetuning_loss_writes_no_model(config, tmp_path, monkeypatch):
    sample = train.PatchSamples.__getitem__

    def poisoned(self, i):
        image, label = sample(self, i)
        return (image * float("nan") if i >= 4 else image), label  # the samples of step 3 on

    monkeypatch.setattr(train.PatchSamples, "__getitem__", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"step 3: the loss is nan \(loss_dice nan, loss_ce nan\)"):
        finetune(config(), out)
    assert not (out / "model.pt").exists() and not (out / "train_log.csv").exists()


def test_a_non_finite_pretraining_loss_writes_nothing_final(tiny_index, tmp_path, monkeypatch):
    sample, calls = loop.RegionViews.sample, itertools.count(1)

    def poisoned(self, volume, rng):
        views = sample(self, volume, rng)
        return {key: view * float("nan") for key, view in views.items()} if next(calls) > 2 else views

    monkeypatch.setattr(loop.RegionViews, "sample", poisoned)  # batch 2 per step: the samples of step 2 on
    out = tmp_path / "pre"
    with pytest.raises(NonFiniteLoss, match=r"step 2: the loss is nan \(loss_restoration nan\)"):
        loop.pretrain(pretrain_config(tmp_path / "pre.json", tiny_index, steps=3, checkpoint_every=1), out)
    assert not any((out / name).exists() for name in ("pretrained.pt", "step_log.csv", "manifest.json"))
    assert (out / "checkpoints" / "last.pt").exists()  # step 1's: a re-run resumes after it


def conv_weight_orders(monkeypatch) -> list[bool]:
    """Filled, for each training forward of a Conv3d whose weight has two orders, with whether the weight is in
    channels_last_3d order."""
    seen = []
    forward = torch.nn.Conv3d.forward

    def recording(self, x):
        if self.training and self.in_channels > 1 and max(self.kernel_size) > 1:  # else the two orders coincide
            seen.append(self.weight.is_contiguous(memory_format=torch.channels_last_3d))
        return forward(self, x)

    monkeypatch.setattr(torch.nn.Conv3d, "forward", recording)
    return seen


def test_channels_last_trains_the_same_network_in_another_memory_order(config, tmp_path, monkeypatch):
    """``channels_last``: the network's convolution weights are in channels_last_3d order while it trains (its
    batches: the next test); the losses equal the default order's to rounding, and model.pt loads into a plain
    network."""
    seen = conv_weight_orders(monkeypatch)
    logs = {}
    for channels_last in (False, True):
        seen.clear()
        out = tmp_path / str(channels_last)
        saved = torch.load(finetune(config(steps=3, val_every=3, channels_last=channels_last), out),
                           weights_only=False)
        logs[channels_last] = pd.read_csv(out / "train_log.csv")
        assert seen and all(seen) == channels_last and any(seen) == channels_last
        assert read_json(out / "manifest.json")["config"]["channels_last"] == channels_last
    assert np.allclose(logs[True]["loss"], logs[False]["loss"], rtol=1e-4)
    network = train.build_downstream(saved["spec"], 1, len(saved["classes"]) + 1).model
    network.load_state_dict(saved["weights"])


def test_channels_last_pretrains_the_same_method_in_another_memory_order(tiny_index, tmp_path, monkeypatch):
    """A method's ``channels_last`` setting: its networks train in channels_last_3d order, the losses equal the
    default order's to rounding, and the pre-trained weights load into a plain downstream network."""
    seen = conv_weight_orders(monkeypatch)
    logs = {}
    for channels_last in (False, True):
        seen.clear()
        out = tmp_path / str(channels_last)
        settings = {"patch_size": [32, 32, 32], "batch_size": 2, "channels_last": channels_last}
        pretrained = loop.pretrain(pretrain_config(tmp_path / "pre.json", tiny_index, method_config=settings,
                                                   steps=3, checkpoint_every=3), out)
        assert seen and all(seen) == channels_last and any(seen) == channels_last
        logs[channels_last] = pd.read_csv(out / "step_log.csv")["loss"]
    assert np.allclose(logs[True], logs[False], rtol=1e-4)
    downstream = build_network({"name": "basicunet", "features": [4, 4, 8, 8, 16, 4]}, 1, 2)
    assert load_pretrained(downstream, pretrained, "basicunet").loaded > 0


@pytest.fixture
def traced_graphs(monkeypatch) -> torch._dynamo.utils.Counter:
    """``torch.compile`` with Dynamo's ``eager`` backend (the graphs traced, not handed to Inductor: seconds instead
    of minutes on 2 cores, the same numbers); returns Dynamo's count of the graphs it traced."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters["stats"]
    torch._dynamo.reset()


def test_compile_runs_the_forward_pass_through_torch_compile(config, tiny_index, tmp_path, traced_graphs):
    """``compile``: the fine-tuning forward pass and a method's loss terms are traced by torch.compile, with the
    losses of the uncompiled runs; the manifest records the setting."""
    for stage in ("finetune", "pretrain"):
        logs = {}
        for compile in (False, True):
            traced_graphs.clear()
            out = tmp_path / stage / str(compile)
            if stage == "finetune":
                finetune(config(steps=2, val_every=2, compile=compile), out)
                logs[compile] = pd.read_csv(out / "train_log.csv")["loss"]
                assert read_json(out / "manifest.json")["config"]["compile"] == compile
            else:
                settings = {"patch_size": [32, 32, 32], "batch_size": 2, "compile": compile}
                loop.pretrain(pretrain_config(tmp_path / "pre.json", tiny_index, method_config=settings, steps=2,
                                              checkpoint_every=2), out)
                logs[compile] = pd.read_csv(out / "step_log.csv")["loss"]
            assert (traced_graphs["unique_graphs"] > 0) == compile, stage
        assert np.allclose(logs[True], logs[False], rtol=1e-5), stage


def test_precision_bfloat16_runs_the_convolutions_under_cpu_autocast(config, tmp_path, monkeypatch):
    """``precision: bfloat16`` runs the training forward pass under bf16 autocast on a CPU (``auto``, the default,
    in float32 there); the weights stay float32, the losses near float32's, and the manifest says which ran."""
    seen = []
    forward = torch.nn.Conv3d.forward

    def recording(self, x):
        out = forward(self, x)
        if self.training:
            seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv3d, "forward", recording)
    logs = {}
    for precision, dtype, recorded in (("auto", torch.float32, "float32"),
                                       ("bfloat16", torch.bfloat16, "bfloat16 autocast")):
        seen.clear()
        out = tmp_path / precision
        saved = torch.load(finetune(config(steps=3, val_every=3, precision=precision), out), weights_only=False)
        assert set(seen) == {dtype}
        assert read_json(out / "manifest.json")["precision"] == recorded
        assert {w.dtype for w in saved["weights"].values() if w.is_floating_point()} == {torch.float32}
        logs[precision] = pd.read_csv(out / "train_log.csv")["loss"]
    assert np.allclose(logs["bfloat16"], logs["auto"], rtol=0.05)


def test_bfloat16_on_a_cpu_without_it_is_named_and_an_unknown_precision_refused(tmp_path, monkeypatch, caplog):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False)
    assert engine(tmp_path / "a", precision="bfloat16").bf16
    assert "emulated" in caplog.text
    with pytest.raises(ValueError, match="precision 'fp16' is not one of auto, float32, bfloat16"):
        engine(tmp_path / "b", precision="fp16")


def test_to_device_puts_only_volumes_in_channels_last_order():
    volume, voxels = torch.rand(2, 3, 4, 5, 6), torch.zeros(2, 8, 3)
    moved = to_device({"view": volume, "voxels": voxels}, torch.device("cpu"), channels_last=True)
    assert moved["view"].is_contiguous(memory_format=torch.channels_last_3d) and not moved["view"].is_contiguous()
    assert moved["voxels"].is_contiguous() and torch.equal(moved["view"], volume)
