"""ssl3d: a reproducibility benchmark suite for self-supervised pre-training in 3D medical image segmentation."""

__version__ = "0.1.0"
