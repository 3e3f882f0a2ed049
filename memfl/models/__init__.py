"""memfl models: every model is a :class:`BlockModel` (ordered ``blocks`` + ``head``).

>>> model = build_model("resnet18", in_channels=3, num_classes=10, image_size=32, width=0.5)
>>> boundary_layers(model, 0)        # ['blocks.0.unit1.conv2', 'blocks.0.unit1.bn2']
>>> [name for name, _ in units(model)][:3]   # ['blocks.0.stem', 'blocks.0.unit0', 'blocks.0.unit1']
"""

from __future__ import annotations

from memfl.models.base import BlockModel, boundary_layers, last_layer_names, units
from memfl.models.cnn import cnn
from memfl.models.resnet import resnet
from memfl.models.vgg import vgg
from memfl.models.vit import vit_tiny

MODEL_NAMES = ("cnn", "resnet18", "resnet34", "vgg11", "vgg16", "vit-tiny")

__all__ = ["MODEL_NAMES", "BlockModel", "build_model", "boundary_layers", "last_layer_names", "units"]


def build_model(
    name: str, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: float = 1.0
) -> BlockModel:
    """Build one of :data:`MODEL_NAMES`.

    ``width`` in (0, 1] scales channel counts (ViT: embedding and MLP dims, heads kept) for
    HeteroFL-style sub-models: the state dict of a width-w model has the same keys as the width-1
    model and every tensor's shape is a leading slice of the full one. Initialisation only uses
    the global torch RNG, so it is deterministic under ``torch.manual_seed``. The build arguments
    are recorded in ``model.arch``.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if in_channels < 1 or num_classes < 1 or image_size < 1:
        raise ValueError(
            f"in_channels, num_classes and image_size must be >= 1, got {in_channels}, {num_classes}, {image_size}"
        )
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    kw = dict(in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)
    if key == "cnn":
        model = cnn(**kw)
    elif key.startswith("resnet"):
        model = resnet(key, **kw)
    elif key.startswith("vgg"):
        model = vgg(key, **kw)
    else:
        model = vit_tiny(**kw)
    model.arch = {"name": key, **kw, **model.arch}
    return model
