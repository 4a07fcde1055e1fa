"""The fine-tuning ``loss`` setting: softmax Dice + CE (the default, as before) or vox2vec's and HDSSL's per-class
sigmoid BCE + soft Dice, checked against the official formula written out by hand; what the setting does to run
identities and how the schema rejects a bad value."""

import copy

import jsonschema
import pandas as pd
import pytest
import torch
import yaml
from monai.losses import DiceCELoss

from ssl3d.finetune.losses import LOSSES, segmentation_loss
from ssl3d.finetune.train import TRAIN_LOG_COLUMNS, finetune
from ssl3d.plan import finetune_runs
from ssl3d.validate import config_problems

from conftest import DEMO, REPO, run_config

SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def batch(dtype=torch.float64, seed=0):
    """Logits of 4 channels (background + 3 classes) and labels in {0, 1, 2}: class 3 is absent."""
    generator = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(2, 4, 6, 5, 4, generator=generator, dtype=torch.float64)).to(dtype)
    label = torch.randint(0, 3, (2, 1, 6, 5, 4), generator=generator)
    return logits.requires_grad_(), label


def official(logits, label):
    """vox2vec / HDSSL ``compute_binary_segmentation_loss`` (rois None) on a head of K = 3 outputs whose logits are
    ours minus the background logit, with one-hot masks of labels 1..K, written out: BCE averaged over everything,
    1 - 2 sum(pg) / (sum(p^2) + sum(g^2) + 1) per patch and class, averaged over the patches then the classes."""
    z = logits[:, 1:] - logits[:, :1]
    g = torch.cat([(label == c) for c in range(1, logits.shape[1])], dim=1).to(z.dtype)
    p = 1 / (1 + torch.exp(-z))
    bce = -(g * torch.log(p) + (1 - g) * torch.log(1 - p)).mean()
    per_class = 1 - 2 * (p * g).sum((2, 3, 4)) / ((p ** 2).sum((2, 3, 4)) + (g ** 2).sum((2, 3, 4)) + 1)
    return bce + per_class.mean(0).mean(), bce, per_class


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_sigmoid_bce_dice_is_the_official_loss_with_its_gradient(dtype, tolerance):
    logits, label = batch(dtype)
    total, terms = segmentation_loss("sigmoid_bce_dice")(logits, label)
    (grad,) = torch.autograd.grad(total, logits)
    logits64 = logits.detach().double().requires_grad_()
    reference, bce, per_class = official(logits64, label)
    (reference_grad,) = torch.autograd.grad(reference, logits64)
    assert total.dtype == dtype
    torch.testing.assert_close(terms["ce"].double(), bce, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(terms["dice"].double(), per_class.mean(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(total.double(), reference, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad.double(), reference_grad, rtol=tolerance, atol=tolerance)
    assert torch.all(per_class[:, 2] == 1)  # an absent class: 1 - 0 / (sum(p^2) + 1), whatever is predicted
    assert torch.all(per_class[:, :2] < 1)


def test_the_argmax_of_the_logits_is_the_official_label_map():
    """``predict_volume``'s argmax over background + K logits = vox2vec's onehot_to_labels(sigmoid probabilities,
    threshold 0.5): background where no class reaches 0.5, else the most probable class."""
    logits, _ = batch(torch.float32, seed=1)
    logits = logits.detach()
    probabilities = torch.sigmoid(logits[:, 1:] - logits[:, :1])
    official_labels = torch.cat([torch.full_like(probabilities[:, :1], 0.5), probabilities], dim=1).argmax(1)
    assert torch.equal(logits.argmax(1), official_labels)
    assert 0 < (official_labels == 0).float().mean() < 1


def test_dice_ce_is_monai_dice_ce_as_before():
    logits, label = batch(torch.float32)
    total, terms = segmentation_loss("dice_ce")(logits, label)
    monai = DiceCELoss(to_onehot_y=True, softmax=True)
    assert torch.equal(total, monai(logits, label))
    assert torch.equal(terms["dice"], monai.dice(logits, label)) and torch.equal(terms["ce"], monai.ce(logits, label))
    assert segmentation_loss()(logits, label)[0].item() == total.item()  # the default


def test_an_unknown_loss_is_named():
    with pytest.raises(ValueError, match="unknown loss 'bce'; known: dice_ce, sigmoid_bce_dice"):
        segmentation_loss("bce")
    assert LOSSES == tuple(SCHEMA["$defs"]["training"]["properties"]["loss"]["enum"])


def with_finetune(**settings) -> dict:
    config = copy.deepcopy(DEMO)
    config["finetune"].update(settings)
    return config


def test_no_loss_key_adds_nothing_to_a_spec_and_a_per_init_loss_makes_new_runs_for_that_init_only():
    base = finetune_runs(DEMO)
    assert not any("loss" in run["spec"] for run in base.values())
    runs = finetune_runs(with_finetune(per_init={"byol": {"loss": "sigmoid_bce_dice"}}))
    assert len(runs) == len(base)
    for name, run in runs.items():
        touched = run["spec"]["init"] == "byol"
        assert (name not in base) == touched
        assert run["spec"].get("loss") == ("sigmoid_bce_dice" if touched else None)
    assert any(run["spec"]["init"] == "byol" for run in runs.values())


def schema_problems(config: dict) -> list[str]:
    """The workflow's schema check (workflow/rules/common.smk): one line per problem with its config path."""
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(config), key=lambda e: list(e.path))
    best = [jsonschema.exceptions.best_match(e.context) if e.context else e for e in errors]
    paths = ["".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".") for e in best]
    return [f"{path or '(top level)'}: {e.message}" for path, e in zip(paths, best)]


def test_the_schema_takes_each_loss_wherever_training_settings_go_and_names_a_bad_one():
    good = with_finetune(loss="sigmoid_bce_dice", per_backbone={"unet": {"loss": "dice_ce"}},
                         per_init={"byol": {"loss": "sigmoid_bce_dice"}},
                         protocols={"finetune": None, "probe": {"loss": "sigmoid_bce_dice"}})
    assert schema_problems(good) == [] and config_problems(good) == []
    bad = with_finetune(per_init={"byol": {"loss": "bce_dice"}})
    assert schema_problems(bad) == ["finetune.per_init.byol.loss: 'bce_dice' is not one of "
                                    "['dice_ce', 'sigmoid_bce_dice']"]


def test_a_short_run_with_the_sigmoid_loss_logs_its_two_terms(tiny_index, tiny_splits, tmp_path):
    config = run_config(tmp_path / "config.json", tiny_index, tiny_splits, loss="sigmoid_bce_dice", steps=4,
                        val_every=4, checkpoint_every=4)
    finetune(config, tmp_path / "run")
    log = pd.read_csv(tmp_path / "run" / "train_log.csv")
    assert list(log.columns) == TRAIN_LOG_COLUMNS and list(log["step"]) == [1, 2, 3, 4]
    assert ((log["loss"] - log["loss_ce"] - log["loss_dice"]).abs() < 1e-5).all()
    assert ((log["loss_dice"] > 0) & (log["loss_dice"] <= 1)).all() and (log["loss_ce"] > 0).all()
