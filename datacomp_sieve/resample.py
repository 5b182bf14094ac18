"""Pillow's bicubic resize, bit for bit, as two matrix products: so that it can run on a GPU.

The captioners' preprocessing (``caption.ImageTransform.crop``: shorter side resized with PIL's
bicubic filter, centre crop) costs a decoding process about twice what decoding the JPEG does.
``crop_batch`` computes the same uint8 pixels for a batch of decoded images on any torch device.

Pillow resizes 8-bit images in two passes (``libImaging/Resample.c``): horizontal then vertical,
except that Pillow 13 runs the vertical pass first when the height shrinks by more than twice
what the width does (``vertical_first``; the passes round in between, so the order shows in the
pixels). For each output position it computes filter weights in double precision, normalises them to sum
1, turns them into integers with 22 fractional bits, and the pass's output is
``clip(floor((2**21 + sum(weight * pixel)) / 2**22), 0, 255)`` in integer arithmetic. Here the
weights are computed the same way (``axis_weights``, numpy float64, the same operations in the
same order), each pass is a product with a matrix holding them, in float64: every product and
partial sum is an integer below 2**53, so exact whatever order the sum is taken in, and the
result equals Pillow's. The centre crop only selects output rows and columns, so only those are
computed. Images of different sizes share one batch: padded with whatever, the matrices' columns
past an image's size are zero. ``matches_pillow()`` checks all this against the installed Pillow
on a few sizes (both orders); where it fails, the engine leaves the resize to Pillow.
"""

from __future__ import annotations

import functools
import math

import numpy as np

#: fractional bits of Pillow's fixed-point weights (``PRECISION_BITS``)
PRECISION_BITS = 22
_SUPPORT = 2.0  # the bicubic filter's


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's ``bicubic_filter`` (a = -0.5), the same float64 operations in the same order."""
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1.0  # ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((((x - 5.0) * x) + 8.0) * x - 4.0) * -0.5  # (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=8192)
def axis_weights(in_size: int, out_size: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's fixed-point weights for resizing an axis of ``in_size`` pixels to ``out_size``,
    output positions ``start .. start + count``: (first input pixel of each (count,) int64,
    weights (count, taps) float64 holding integers; taps past a position's window are 0)."""
    scale = float(np.float32(in_size)) / out_size  # (double)(in1 - in0) / outSize, in1 - in0 a float
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(start, start + count, dtype=np.float64) + 0.5) * scale
    xmin = np.trunc(center - support + 0.5).astype(np.int64).clip(min=0)  # (int) truncates
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    t = np.arange(taps)
    inside = t[None] < xmax[:, None]
    w = _bicubic(((t[None] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(inside, w, 0.0)
    total = np.zeros(count)
    for k in range(taps):  # summed in order, as Pillow does
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.trunc(np.where(w < 0, -0.5 + w * (1 << PRECISION_BITS), 0.5 + w * (1 << PRECISION_BITS)))
    return xmin, np.where(inside, fixed, 0.0)


def _matrices(axes, length: int, device):
    """Dense (B, count, length) float64 matrices from ``axis_weights`` results, built on
    ``device``: only the taps travel there (a matrix is about 200 times their size). A position
    gets one weight and the zeros of clamped taps, so the sums are exact in any order."""
    import torch

    taps = max(w.shape[1] for _, w in axes)
    first = np.empty((len(axes), axes[0][0].shape[0]), dtype=np.int64)
    weights = np.zeros((*first.shape, taps))  # (np.pad per image costs ten times this loop)
    for i, (x, w) in enumerate(axes):
        first[i] = x
        weights[i, :, :w.shape[1]] = w
    cols = torch.from_numpy(first[:, :, None] + np.arange(taps)).to(device).clamp_(max=length - 1)  # 0-weight taps may overshoot
    out = torch.zeros(len(axes), first.shape[1], length, dtype=torch.float64, device=device)
    return out.scatter_add_(2, cols, torch.from_numpy(weights).to(device))


def _clip8(x):
    """Pillow's ``clip8`` of 2**21 + x: floor((2**21 + x) / 2**22) into 0..255 (exact in float64)."""
    half = float(1 << (PRECISION_BITS - 1))
    return x.add_(half).div_(float(1 << PRECISION_BITS)).floor_().clamp_(0, 255)


def vertical_first(height: int, width: int, new_height: int, new_width: int) -> bool:
    """Whether the installed Pillow runs the vertical pass first for this resize."""
    import PIL

    if int(PIL.__version__.split(".")[0]) < 13:
        return False
    return height - new_height > 0 and height - new_height > (width - new_width) * 2


def crop_batch(images, sizes, plans, size: int, chunk: int = 32):
    """uint8 (B, size, size, 3) crops of decoded RGB images, as ``ImageTransform.crop`` makes them.

    ``images``: uint8 (B, H, W, 3) on any device, image i in ``[:h_i, :w_i]`` (the rest ignored);
    ``sizes``: (h_i, w_i); ``plans``: (resized height, resized width, crop top, crop left) each
    (``ImageTransform.crop_plan``). Runs ``chunk`` images at a time (float64 copies are large)."""
    import torch

    b, height, width, _ = images.shape
    out = torch.empty((b, size, size, 3), dtype=torch.uint8, device=images.device)
    order = [vertical_first(h, w, nh, nw) for (h, w), (nh, nw, _, _) in zip(sizes, plans)]
    for first in (False, True):
        todo = [i for i in range(b) if order[i] == first]
        for i in range(0, len(todo), chunk):
            part = todo[i:i + chunk]
            rows = _matrices([axis_weights(sizes[j][0], plans[j][0], plans[j][2], size) for j in part],
                             height, images.device)[:, None]  # (n, 1, size, H)
            cols = _matrices([axis_weights(sizes[j][1], plans[j][1], plans[j][3], size) for j in part],
                             width, images.device).transpose(1, 2)[:, None]  # (n, 1, W, size)
            x = images[part].permute(0, 3, 1, 2).to(torch.float64)  # (n, 3, H, W)
            if first:  # vertical pass, then horizontal
                x = _clip8(torch.matmul(_clip8(torch.matmul(rows, x)), cols))
            else:
                x = _clip8(torch.matmul(rows, _clip8(torch.matmul(x, cols))))
            out[part] = x.to(torch.uint8).permute(0, 2, 3, 1)
    return out


def matches_pillow(transform, device="cpu") -> bool:
    """Whether ``crop_batch`` on ``device`` gives ``transform.crop``'s pixels with the installed
    Pillow, on random images of a few sizes (shrunk, enlarged, tall, wide: both pass orders)."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(512, 341), (341, 512), (700, 300), (300, 700), (700, 90), (31, 47), (transform.size, transform.size + 1)]
    batch = np.zeros((len(sizes), 700, 700, 3), dtype=np.uint8)
    want = []
    for i, (h, w) in enumerate(sizes):
        batch[i, :h, :w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want.append(np.asarray(transform.crop(Image.fromarray(batch[i, :h, :w]))))
    got = crop_batch(torch.from_numpy(batch).to(device), sizes, [transform.crop_plan(h, w) for h, w in sizes],
                     transform.size)
    return all(np.array_equal(g, w) for g, w in zip(got.cpu().numpy(), want))
