"""Named pretrained weights, as data: torchvision's ImageNet-1K checkpoints of
the presets torchvision publishes, each with its file, published accuracy
and eval transform (torchvision's weights metadata, torchvision 0.29).

keras_resnext hosts no weight files: the names resolve to torchvision's URLs
(`fetch` downloads and caches them). `TORCHVISION_BASE_URL` and
`HF_BASE_URL` may be redirected, e.g. to a mirror, with the environment
variables `KERAS_RESNEXT_TORCHVISION_URL` and `KERAS_RESNEXT_HF_URL` (or
huggingface_hub's own `HF_ENDPOINT`).
"""

import dataclasses
import os

from keras_resnext.models import IMAGENET_STAGE_DEPTHS, default_name
from keras_resnext.transforms import EvalTransform

TORCHVISION_BASE_URL = "https://download.pytorch.org/models/"
HF_BASE_URL = "https://huggingface.co/"
TORCHVISION_URL_VARIABLE = "KERAS_RESNEXT_TORCHVISION_URL"
HF_URL_VARIABLE = "KERAS_RESNEXT_HF_URL"
HF_ENDPOINT_VARIABLE = "HF_ENDPOINT"  # huggingface_hub's, for mirrors

# "imagenet" is each preset's best: torchvision's DEFAULT (V2 where it has one).
BEST = "imagenet"
V1, V2 = "IMAGENET1K_V1", "IMAGENET1K_V2"


@dataclasses.dataclass(frozen=True)
class NamedWeights:
    """One published checkpoint: where it is, what it scores, how it is evaluated."""

    architecture: str  # our preset name, also timm's and torchvision's model name
    name: str  # torchvision's weights name
    file: str  # under the base URL; `-<hex>.` in it is its sha256's prefix
    top1: float  # ImageNet-1K val, single crop, as published
    top5: float
    resize_size: int  # shorter side, before the centre crop
    image_size: int = 224
    interpolation: str = "bilinear"  # antialiased, as torchvision's eval transform
    source: str = "torchvision"

    @property
    def url(self):
        return torchvision_base_url() + self.file

    @property
    def eval_transform(self):
        return EvalTransform(self.image_size, self.resize_size, self.interpolation)


def _torchvision(architecture, name, file, top1, top5, resize_size):
    return NamedWeights(architecture, name, file, top1, top5, resize_size)


TORCHVISION_WEIGHTS = (
    _torchvision("resnet50", V1, "resnet50-0676ba61.pth", 76.130, 92.862, 256),
    _torchvision("resnet50", V2, "resnet50-11ad3fa6.pth", 80.858, 95.434, 232),
    _torchvision("resnet101", V1, "resnet101-63fe2227.pth", 77.374, 93.546, 256),
    _torchvision("resnet101", V2, "resnet101-cd907fc2.pth", 81.886, 95.780, 232),
    _torchvision("resnet152", V1, "resnet152-394f9c45.pth", 78.312, 94.046, 256),
    _torchvision("resnet152", V2, "resnet152-f82ba261.pth", 82.284, 96.002, 232),
    _torchvision("resnext50_32x4d", V1, "resnext50_32x4d-7cdf4587.pth", 77.618, 93.698, 256),
    _torchvision("resnext50_32x4d", V2, "resnext50_32x4d-1a0047aa.pth", 81.198, 95.340, 232),
    _torchvision("resnext101_32x8d", V1, "resnext101_32x8d-8ba56ff5.pth", 79.312, 94.526, 256),
    _torchvision("resnext101_32x8d", V2, "resnext101_32x8d-110c445d.pth", 82.834, 96.228, 232),
    _torchvision("resnext101_64x4d", V1, "resnext101_64x4d-173b62eb.pth", 83.246, 96.454, 232),
)


def torchvision_base_url():
    return _with_slash(os.environ.get(TORCHVISION_URL_VARIABLE) or TORCHVISION_BASE_URL)


def hf_base_url():
    return _with_slash(os.environ.get(HF_URL_VARIABLE) or os.environ.get(HF_ENDPOINT_VARIABLE)
                       or HF_BASE_URL)


def _with_slash(url):
    return url if url.endswith("/") else url + "/"


def weight_names():
    """The names `weights=` takes (case-insensitive), best first."""
    return [BEST] + sorted({entry.name for entry in TORCHVISION_WEIGHTS})


def is_weights_name(weights):
    return isinstance(weights, str) and weights.lower() in {n.lower() for n in weight_names()}


def architecture_name(stem, stage_depths, cardinality, width):
    """The name weights are published under for an architecture
    ("resnext50_32x4d", "resnet101", "resnext29_8x64d"), or None for one
    outside the family's tables."""
    depth = 3 * sum(stage_depths) + 2
    if stem == "imagenet":
        standard = IMAGENET_STAGE_DEPTHS.get(depth) == tuple(stage_depths)
    else:
        # A CIFAR ResNeXt-101 would share its name with the ImageNet one.
        standard = len(set(stage_depths)) == 1 and depth not in IMAGENET_STAGE_DEPTHS
    return default_name(depth, cardinality, width) if standard else None


def named_weights(weights, architecture):
    """The `NamedWeights` that the name `weights` gives `architecture`, or
    raise (one line) saying which presets have which names."""
    wanted = weights.lower()
    available = [entry for entry in TORCHVISION_WEIGHTS if entry.architecture == architecture]
    if wanted == BEST and available:
        return max(available, key=lambda entry: entry.name)  # V2 where published
    for entry in available:
        if entry.name.lower() == wanted:
            return entry
    what = architecture or "this architecture"
    raise ValueError(
        f"weights={weights!r}: {what} has no weights of that name. Named weights: "
        f"{_listing()} (keras_resnext hosts no weight files: these are torchvision's; see the "
        f"README's 'Pretrained weights'). Otherwise pass a weights file, an http(s):// or "
        f"file:// URL, or hf://OWNER/REPO."
    )


def _listing():
    names = {}
    for entry in TORCHVISION_WEIGHTS:
        names.setdefault(entry.architecture, []).append(entry.name)
    return "; ".join(f"{architecture} ({', '.join(sorted(found))})"
                     for architecture, found in names.items())
