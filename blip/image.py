"""Image preprocessing, bit-exact with the original BLIP transform.

Original eval transform: Resize((S, S), bicubic) -> ToTensor (/255) -> Normalize(CLIP mean/std). The resize is done
with PIL on uint8 (as torchvision does for PIL inputs), so the CPU decode stage can ship compact uint8 arrays to the
model device and normalise there.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_rgb(img: Image.Image, size: int) -> np.ndarray:
    """PIL image -> (size, size, 3) uint8, bicubic, aspect ratio not kept (as the original)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def normalize(
    pixels: torch.Tensor | np.ndarray,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) normalised float, on whatever device `pixels` lives."""
    x = torch.as_tensor(pixels)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S) in [0, 1]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


def preprocess(
    images: list[Image.Image],
    image_size: int,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> torch.Tensor:
    """List of PIL images -> (B, 3, S, S) float32 pixel values."""
    pixels = np.stack([resize_rgb(im, image_size) for im in images])  # (B, S, S, 3) uint8
    return normalize(pixels, mean, std)
