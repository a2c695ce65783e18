"""LPIPS of a big image, computed over tiles with exactly the whole-image value.

LPIPS (Zhang et al. 2018) is, per backbone layer, the spatial mean of a 1x1-conv-weighted
squared difference of channel-normalised features, summed over layers. Every feature position
depends only on its receptive field, so the whole-image features can be computed tile by tile:
each tile is run with a halo wider than the receptive field's radius, and only the positions it
owns are kept; tiles start on multiples of the backbone's total stride, so every layer's grid
lines up with the whole image's (VGG16: stride 16 at relu5_3, receptive field 212 px, halo 112).
The per-layer sums over owned positions, divided by each layer's whole-image size, give the
untiled value to float rounding, with memory bounded by the tile (the untiled VGG pass keeps
about 120 floats a pixel for both images: 10 GB at 10 MP).

Only VGG is tiled: AlexNet's first convolution has stride 4, so its activations are small.
"""

from __future__ import annotations

import torch

VGG_STRIDES = (1, 2, 4, 8, 16)  # relu1_2 .. relu5_3
ALIGN, HALO = 16, 112


def tiled_lpips_vgg(model, x: torch.Tensor, y: torch.Tensor, tile: int = 512) -> torch.Tensor:
    """``model(x, y)`` of an ``lpips.LPIPS(net="vgg")``, (B,), computed over ``tile``-px tiles."""
    import lpips

    h, w = x.shape[-2:]
    sizes = [(h, w)]
    for _ in VGG_STRIDES[1:]:  # max-pooling 2x2 floors each level
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    tile = max(ALIGN, tile // ALIGN * ALIGN)
    sums = torch.zeros(len(VGG_STRIDES), x.shape[0], dtype=torch.float64)
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            bottom, right = min(top + tile, h), min(left + tile, w)
            r0, c0 = max(0, top - HALO), max(0, left - HALO)
            r1, c1 = min(h, bottom + HALO), min(w, right + HALO)
            a = model.scaling_layer(x[..., r0:r1, c0:c1].float())
            b = model.scaling_layer(y[..., r0:r1, c0:c1].float())
            feats_a, feats_b = model.net(a), model.net(b)
            for k, stride in enumerate(VGG_STRIDES):
                diff = (lpips.normalize_tensor(feats_a[k]) - lpips.normalize_tensor(feats_b[k])) ** 2
                score = model.lins[k](diff)  # (B, 1, h_k, w_k) of this tile's input
                lh, lw = sizes[k]
                own_r = (top // stride, lh if bottom == h else bottom // stride)
                own_c = (left // stride, lw if right == w else right // stride)
                part = score[..., own_r[0] - r0 // stride : own_r[1] - r0 // stride,
                             own_c[0] - c0 // stride : own_c[1] - c0 // stride]
                sums[k] += part.double().sum(dim=(1, 2, 3)).cpu()
    means = sums / torch.tensor([lh * lw for lh, lw in sizes], dtype=torch.float64)[:, None]
    return means.sum(0).float()
