"""The segmentation losses a fine-tuning run can train with (the ``loss`` training setting).

The suite's default is MONAI's softmax Dice + cross-entropy; vox2vec and hierarchical dense SSL fine-tune and probe
with a per-class sigmoid BCE + soft Dice, which their downstream numbers (HDSSL Tables 1-3) were measured with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.utils import one_hot

LOSSES = ("dice_ce", "sigmoid_bce_dice")


def segmentation_loss(name: str = "dice_ce"):
    """The training loss ``name`` as ``loss(logits, label) -> (total, {"dice": ..., "ce": ...})``: ``logits`` are
    the network's (B, K+1, ...) outputs (channel 0 the background), ``label`` the (B, 1, ...) class indices.

    ``dice_ce``: MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)`` (softmax Dice over all K+1 channels + cross
    entropy), its two terms summed as it sums them.

    ``sigmoid_bce_dice``: the downstream loss of vox2vec and HDSSL (``compute_binary_segmentation_loss`` of their
    ``nn/functional/segmentation.py``): for each foreground class c, p_c = sigmoid(z_c) and g_c its one-hot mask;
    ``"ce"`` = binary cross-entropy averaged over batch, classes and voxels; ``"dice"`` = 1 - 2 sum(p g) /
    (sum(p^2) + sum(g^2) + 1) per patch and class, averaged (a class absent from a patch costs 1); total = ce +
    dice. Their heads have no background channel (K outputs, one-hot of labels 1..K); ours has one, so z_c is the
    class logit minus the background logit: the loss is theirs on an equivalent K-output head, and the argmax of
    the K+1 logits (``predict_volume``) is background where no sigmoid reaches 0.5, else the most probable class,
    which is their ``onehot_to_labels(threshold=0.5)``; their test Dice instead thresholds each class on its own (a
    voxel can count for two classes). vox2vec computes the loss inside a body mask, HDSSL on the whole patch, as
    here.
    """
    if name == "dice_ce":
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

        def loss(logits, label):
            terms = {"dice": dice_ce.dice(logits, label), "ce": dice_ce.ce(logits, label)}
            return dice_ce.lambda_dice * terms["dice"] + dice_ce.lambda_ce * terms["ce"], terms
    elif name == "sigmoid_bce_dice":
        dice = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1.0)

        def loss(logits, label):
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 too coarse for sums
            relative = logits[:, 1:] - logits[:, :1]
            target = one_hot(label, logits.shape[1], dtype=logits.dtype)[:, 1:]
            terms = {"dice": dice(relative, target), "ce": F.binary_cross_entropy_with_logits(relative, target)}
            return terms["ce"] + terms["dice"], terms
    else:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return loss
