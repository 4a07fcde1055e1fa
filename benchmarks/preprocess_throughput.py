"""Preprocessing throughput: cases/s and MB/s of a named recipe on a freshly generated phantom set.

MB/s counts the uncompressed voxel data read (images and labels, as stored: int16), the figure that compares
across datasets; the compressed NIfTI bytes on disk are reported beside it. The first run of a recipe is timed
(a re-run only checks each cached case's recipe hash and is near-instant).

    python benchmarks/preprocess_throughput.py                          # BTCV recipe, the demo's 20 phantom cases
    python benchmarks/preprocess_throughput.py --recipe hdssl_ct --cases 40
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from ssl3d.data.cache import preprocess_dataset
from ssl3d.data.dataset import read_dataset
from ssl3d.data.phantom import write_phantom_dataset
from ssl3d.data.recipes import get_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="btcv_swinunetr")
    parser.add_argument("--cases", type=int, default=20, help="phantom cases, 60%% labelled (the demo: 12 + 8)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 48])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.6, 1.6, 3.0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "phantom"
        labelled = round(0.6 * args.cases)
        write_phantom_dataset(root, labelled, args.cases - labelled, seed=0, shape=args.shape, spacing=args.spacing)
        dataset = read_dataset(root)
        files = [path for case in dataset.labelled + dataset.unlabelled for path in (case.image, case.label)
                 if path is not None]
        headers = [nib.load(path).header for path in files]
        voxel_mb = sum(h.get_data_dtype().itemsize * np.prod(h.get_data_shape()) for h in headers) / 1e6
        disk_mb = sum(path.stat().st_size for path in files) / 1e6
        start = time.perf_counter()
        preprocess_dataset(root, get_recipe(args.recipe), Path(tmp) / "cache")
        seconds = time.perf_counter() - start
    print(json.dumps({"recipe": args.recipe, "cases": args.cases, "shape": args.shape, "seconds": round(seconds, 2),
                      "cases_per_s": round(args.cases / seconds, 2), "voxel_mb_per_s": round(voxel_mb / seconds, 1),
                      "disk_mb_per_s": round(disk_mb / seconds, 1), "voxel_mb": round(voxel_mb, 1),
                      "disk_mb": round(disk_mb, 1)}))


if __name__ == "__main__":
    main()
