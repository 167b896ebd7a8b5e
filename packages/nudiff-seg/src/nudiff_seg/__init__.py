"""nudiff-seg: HoVer-Net for nuclei segmentation, trained on real and synthetic pairs.

The model (:mod:`._hovernet`: the reference's original and fast modes, a light variant for
CPUs), its targets and losses (:mod:`._losses`), window sampling with augmentation and
real/synthetic mixing (:mod:`._data`), resumable training (:mod:`._train`), tiled
inference (:mod:`._predict`), HoVer-Net's own released weights (:mod:`._reference_weights`)
and a torchvision-layout ResNet for ImageNet weights and patch embeddings.
"""

from ._data import Augment, MixedBatches, Tiles, check_synthetic_ratio, load_tiles, read_name_list, window_origins
from ._features import IMAGENET_MEAN, IMAGENET_STD, load_backbone, patch_embeddings
from ._hovernet import (
    PRESETS,
    HoVerNet,
    HoVerNetConfig,
    build_hovernet,
    load_encoder_from_torchvision,
    load_hovernet,
    save_hovernet,
)
from ._losses import hovernet_loss, targets
from ._predict import predict_instances, predict_structure, score_pairs, write_prediction
from ._reference_weights import load_encoder_from_reference, load_encoder_weights, load_reference_hovernet
from ._resnet import ResNet, load_resnet_weights, resnet18, resnet50
from ._train import SegTrainConfig, train_hovernet

__version__ = "0.1.0"

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "Augment",
    "HoVerNet",
    "HoVerNetConfig",
    "MixedBatches",
    "ResNet",
    "SegTrainConfig",
    "Tiles",
    "build_hovernet",
    "check_synthetic_ratio",
    "hovernet_loss",
    "load_backbone",
    "load_encoder_from_reference",
    "load_encoder_from_torchvision",
    "load_encoder_weights",
    "load_hovernet",
    "load_reference_hovernet",
    "load_resnet_weights",
    "load_tiles",
    "patch_embeddings",
    "predict_instances",
    "predict_structure",
    "read_name_list",
    "resnet18",
    "resnet50",
    "save_hovernet",
    "score_pairs",
    "targets",
    "train_hovernet",
    "window_origins",
    "write_prediction",
]
