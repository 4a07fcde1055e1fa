"""The shared patch masking: MAE-style mask counts, the raster patch layout and applying a mask."""

from __future__ import annotations

import torch

from ssl3d.pretrain.bricks.masking import apply_patch_mask, patchify, random_patch_mask, unpatchify


def test_random_patch_mask_counts_and_generator():
    mask = random_patch_mask(5, 216, 0.4, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (5, 216) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(mask.sum(dim=1), torch.full((5,), 87.0))
    assert torch.equal(mask, random_patch_mask(5, 216, 0.4, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(mask[0], mask[1])
    assert random_patch_mask(2, 64, 0.75).sum(dim=1).tolist() == [48.0, 48.0]


def test_patchify_layout_and_round_trip():
    x = torch.randn(2, 3, 8, 12, 4)
    patches = patchify(x, 4)
    assert patches.shape == (2, 2 * 3 * 1, 4 ** 3 * 3)
    ix, iy, iz = 1, 2, 0
    block = x[1, :, 4 * ix:4 * ix + 4, 4 * iy:4 * iy + 4, 4 * iz:4 * iz + 4]
    index = (ix * 3 + iy) * 1 + iz
    assert torch.equal(patches[1, index], block.permute(1, 2, 3, 0).reshape(-1))  # voxels raster, channel fastest
    assert torch.equal(unpatchify(patches, 4, (2, 3, 1)), x)
    cube = torch.randn(1, 1, 96, 96, 96)
    assert torch.equal(unpatchify(patchify(cube, 16), 16, 6), cube)


def test_apply_patch_mask_zeroes_exactly_the_masked_patches():
    x = torch.rand(2, 2, 24, 24, 24) + 1.0
    mask = random_patch_mask(2, 27, 0.4, generator=torch.Generator().manual_seed(0))
    masked = apply_patch_mask(x, mask, 8)
    mp, xp = patchify(masked, 8), patchify(x, 8)
    hit = mask.bool()
    assert (mp[hit] == 0).all() and torch.equal(mp[~hit], xp[~hit])
    assert (apply_patch_mask(x, mask, 8, mask_value=-1.0) == -1).sum() == hit.sum() * 8 ** 3 * 2
