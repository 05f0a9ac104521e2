"""Training-only augmentation of CXR batches (torchvision transforms, one draw per image).

Applied to (B, 1, S, S) images in [0, 1] before normalisation; never used at evaluation.
Small rotations, shifts and zooms, and brightness/contrast jitter mimic differences between
detectors and positioning. Horizontal flips are off by default: a CXR's left and right differ.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


class CXRAugment:
    def __init__(
        self,
        rotate_degrees: float = 7.0,
        translate: float = 0.05,
        scale: tuple[float, float] = (0.9, 1.1),
        brightness: float = 0.1,
        contrast: float = 0.1,
        hflip: bool = False,
    ) -> None:
        steps: list[torch.nn.Module] = [
            v2.RandomAffine(
                degrees=rotate_degrees, translate=(translate, translate), scale=scale, fill=0.0
            )
        ]
        if brightness or contrast:
            steps.append(v2.ColorJitter(brightness=brightness, contrast=contrast))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(steps)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, 1, S, S), each image with its own random draw, clipped to [0, 1]."""
        out = torch.stack([self.transform(img) for img in batch])
        return out.clamp_(0.0, 1.0)
