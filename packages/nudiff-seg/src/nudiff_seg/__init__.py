"""nudiff-seg: the segmentation side of nudiff. This development version holds the
torchvision-layout ResNet backbone and patch embeddings; HoVer-Net follows."""

from ._features import IMAGENET_MEAN, IMAGENET_STD, load_backbone, patch_embeddings
from ._resnet import ResNet, load_resnet_weights, resnet18, resnet50

__version__ = "0.1.0.dev0"

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ResNet",
    "load_backbone",
    "load_resnet_weights",
    "patch_embeddings",
    "resnet18",
    "resnet50",
]
