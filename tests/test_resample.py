"""resample.py: Pillow's bicubic resize and the captioners' centre crop, bit for bit, as matrices."""

import numpy as np
import pytest
import torch
from PIL import Image

from datacomp_sieve import resample
from datacomp_sieve.caption import ImageTransform


def _image(rng, h, w, kind):
    if kind == 0:  # noise
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == 1:  # ramps
        return (np.add.outer(np.arange(h), np.arange(w))[:, :, None] * np.array([1, 2, 3]) % 256).astype(np.uint8)
    return np.where(rng.random((h, w, 1)) < 0.5, 0, 255).repeat(3, 2).astype(np.uint8)  # hard edges: clipping


@pytest.mark.parametrize("size,resize", [(224, None), (224, 256), (64, None)])
def test_crop_batch_equals_pillow_and_torchvision(size, resize):
    """Every size class: shrunk and enlarged, tall and wide (both of Pillow's pass orders), tiny,
    already the right size, one pixel off, in one batch padded with junk."""
    tr = ImageTransform(size, resize=resize)
    rng = np.random.default_rng(size)
    sizes = [(512, 512), (300, 451), (341, 512), (700, 300), (300, 700), (1, 1), (2, 3), (size, size),
             (size - 1, size + 1), (3, 900), (700, 5), (480, 640), (1000, 1000)]
    sizes += [tuple(int(v) for v in rng.integers(1, 800, 2)) for _ in range(12)]
    batch = np.full((len(sizes), max(h for h, _ in sizes), max(w for _, w in sizes), 3), 77, np.uint8)
    want = []
    for i, (h, w) in enumerate(sizes):
        batch[i, :h, :w] = _image(rng, h, w, i % 3)
        want.append(np.asarray(tr.crop(Image.fromarray(batch[i, :h, :w]))))
    assert any(resample.vertical_first(h, w, *tr.crop_plan(h, w)[:2]) for h, w in sizes) or \
        not resample.vertical_first(700, 300, 522, 224)  # both orders covered where Pillow has both
    got = resample.crop_batch(torch.from_numpy(batch), sizes, [tr.crop_plan(h, w) for h, w in sizes], size, chunk=7)
    assert got.dtype == torch.uint8 and got.shape == (len(sizes), size, size, 3)
    for i, (h, w) in enumerate(sizes):
        assert np.array_equal(got[i].numpy(), want[i]), (h, w)


def test_self_check_catches_the_wrong_pass_order(monkeypatch):
    tr = ImageTransform(224)
    assert resample.matches_pillow(tr)
    if resample.vertical_first(700, 300, *tr.crop_plan(700, 300)[:2]):  # this Pillow has both orders
        monkeypatch.setattr(resample, "vertical_first", lambda *a: False)
        assert not resample.matches_pillow(tr)
