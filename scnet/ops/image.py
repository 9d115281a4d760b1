"""Image geometry shared by the data pipeline and the detector."""
import numpy as np
import torch


def rescale_size(height, width, scale):
    """Keep-ratio size fitting (long, short) = ``scale``: int(side * s + 0.5) [impl 16.1, 24.21]."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def as_chw_tensor(image):
    """An (H, W, 3) numpy array or a (3, H, W) tensor as a (3, H, W) tensor (no copy of a tensor)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) RGB tensor, got {getattr(image, 'shape', type(image))}")
    return image
