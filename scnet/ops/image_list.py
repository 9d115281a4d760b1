"""A padded batch of images of different sizes."""


def pad_to(tensors, size, pad_value):
    """Stack (..., H_i, W_i) tensors into one batch of spatial ``size`` (h, w), bottom/right padded."""
    out = tensors[0].new_full((len(tensors),) + tuple(tensors[0].shape[:-2]) + tuple(size), pad_value)
    for o, t in zip(out, tensors):
        o[..., : t.shape[-2], : t.shape[-1]].copy_(t)
    return out


class ImageList:
    """``tensor`` (N, C, H, W) padded at the bottom/right; ``image_sizes`` the (h, w) of each image."""

    def __init__(self, tensor, image_sizes):
        self.tensor = tensor
        self.image_sizes = [tuple(int(v) for v in s) for s in image_sizes]

    @staticmethod
    def from_tensors(tensors, size_divisibility=32, pad_value=0.0):
        """Pad (C, H_i, W_i) tensors to a common size, a multiple of ``size_divisibility``."""
        h = max(t.shape[-2] for t in tensors)
        w = max(t.shape[-1] for t in tensors)
        h, w = (-(-v // size_divisibility) * size_divisibility for v in (h, w))
        return ImageList(pad_to(tensors, (h, w), pad_value), [t.shape[-2:] for t in tensors])
