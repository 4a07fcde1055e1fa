"""Pre-training bricks shared by several methods, filed by kind rather than by the method that first needed them.

* :mod:`~ssl3d.pretrain.bricks.losses`: contrastive and regression losses (NT-Xent, voxel InfoNCE, BYOL's
  normalised regression);
* :mod:`~ssl3d.pretrain.bricks.heads`: projector / predictor heads (MLP and 1×1×1 convolutional);
* :mod:`~ssl3d.pretrain.bricks.masking`: patch masking for masked image modelling;
* :mod:`~ssl3d.pretrain.bricks.views`: augmented views (PGL's augmentation list, BYOL's two views);
* :mod:`~ssl3d.pretrain.bricks.ema`: the exponential-moving-average target network;
* :mod:`~ssl3d.pretrain.bricks.genesis_transforms`: Models Genesis' distortions (local pixel shuffling, the Bézier
  intensity curve, in- and out-painting), which hierarchical dense SSL's local augmentations reuse.

Import from the submodules. A method imports bricks, never another method's ``*_parts`` module; a piece only one
method uses stays in that method's parts module until a second method needs it, then moves here.
"""
