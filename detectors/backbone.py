"""ResNet + feature pyramid, with torchvision's architecture so its weights load through a readable key map.

    ResNetBody           torchvision's ResNet without the classifier: image -> C2..C5 (strides 4..32)
    build_resnet         a ResNetBody by name, BatchNorm trainable or frozen, early stages frozen
    load_backbone_weights   a local torchvision ImageNet checkpoint into a ResNetBody
    FPN                  lateral 1x1 + top-down sum + 3x3 output convs (Lin et al. 2017), optional P6 / P7
    ResNetFPN            body + FPN: normalised image -> list of pyramid maps
    build_resnet_fpn     the backbone every detector here uses
    torchvision_backbone_key   a torchvision detection key ("backbone.body...", "backbone.fpn...") -> ours

Level l has stride 2^l: C2/P2 = 4, C3/P3 = 8, ..., P7 = 128. Feature maps are (B, channels, H_l, W_l)
with H_l = ceil(H / 2^l) (each stride-2 conv rounds up).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
STAGES = ("layer1", "layer2", "layer3", "layer4")  # C2, C3, C4, C5


class ResNetBody(nn.Module):
    """torchvision's ResNet up to its last stage: (B, 3, H, W) normalised -> [C2, C3, C4, C5].

    The module names (conv1, bn1, layer1..layer4) are torchvision's, so an ImageNet state dict loads as is
    once its classifier ("fc.*") is dropped. `channels[i]` is the width of C(i+2).
    """

    def __init__(self, resnet: torchvision.models.ResNet):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        width = 1 if isinstance(resnet.layer1[0], torchvision.models.resnet.BasicBlock) else 4  # bottleneck x4
        self.channels = [64 * width, 128 * width, 256 * width, 512 * width]

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) -> [C2 (B, c2, H/4, W/4), C3 (.., H/8, ..), C4 (.., H/16, ..), C5 (.., H/32, ..)]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            outputs.append(x)
        return outputs

    def freeze(self, frozen_stages: int) -> None:
        """Stop gradients to the stem (conv1, bn1) and the first `frozen_stages` stages (-1: freeze nothing).

        torchvision's `trainable_layers = t` is `frozen_stages = 4 - t` (t = 3, its default, freezes the
        stem and layer1).
        """
        if frozen_stages < 0:
            return
        for module in [self.conv1, self.bn1, *[getattr(self, s) for s in STAGES[:frozen_stages]]]:
            module.requires_grad_(False)


def build_resnet(name: str, *, frozen_stages: int = -1, frozen_bn: bool = False) -> ResNetBody:
    """A randomly initialised ResNetBody ("resnet18" / "34" / "50" / "101"), torchvision's initialisation.

    frozen_bn: FrozenBatchNorm2d (fixed statistics and affine, what a pretrained backbone uses with small
        batches) instead of trainable BatchNorm2d (training from scratch).
    frozen_stages: see ResNetBody.freeze.
    """
    if name not in RESNETS:
        raise ValueError(f"detectors/backbone.py: unknown backbone {name!r}, expected one of {RESNETS}")
    norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    body = ResNetBody(getattr(torchvision.models.resnet, name)(weights=None, norm_layer=norm_layer))
    body.freeze(frozen_stages)
    return body


def load_backbone_weights(body: ResNetBody, path: str | Path) -> None:
    """Load a torchvision ImageNet checkpoint (a state dict saved with torch.save) into `body`.

    The classifier ("fc.*") is dropped; "num_batches_tracked" is dropped when the body uses frozen BatchNorm
    (which has no such buffer). Anything else missing or left over raises an error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    own_keys = set(body.state_dict())
    state = {key: value for key, value in state.items()
             if not key.startswith("fc.") and not (key.endswith("num_batches_tracked") and key not in own_keys)}
    missing, unexpected = sorted(own_keys - set(state)), sorted(set(state) - own_keys)
    if missing or unexpected:
        raise ValueError(f"{path}: not a torchvision ResNet checkpoint for this backbone; "
                         f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    try:
        body.load_state_dict(state, strict=True)
    except RuntimeError as error:  # shape mismatch, e.g. resnet18 weights into a resnet50
        raise ValueError(f"{path}: does not fit the backbone: {error}") from error


class FPN(nn.Module):
    """Feature pyramid network (Lin et al. 2017, Sec. 3 and Fig. 3), torchvision's layers and initialisation.

    For each input level: a 1x1 lateral conv; going top-down, the coarser merged map is upsampled
    (nearest, to the finer map's size) and added; a 3x3 conv then gives the output P_l. Extra levels:
        "p6p7"     P6 = conv3x3/2(x), P7 = conv3x3/2(relu(P6)) with x = P5 or C5 (`p6p7_from`); RetinaNet
                   paper, Sec. 4 ("P6 ... on C5"); torchvision's retinanet_resnet50_fpn and fcos_resnet50_fpn
                   (v1) take P5, the v2 models C5.
        "maxpool"  P6 = P5 subsampled with stride 2 (Faster R-CNN's FPN, for the RPN only)
        None       nothing

    Args:
        in_channels_list: channels of the input maps, finest first (e.g. C3, C4, C5).
        out_channels: channels of every output map.
    """

    def __init__(self, in_channels_list: list[int], out_channels: int, *, extra_blocks: str | None = "p6p7",
                 p6p7_from: str = "p5"):
        super().__init__()
        if extra_blocks not in ("p6p7", "maxpool", None):
            raise ValueError(f"detectors/backbone.py: extra_blocks must be 'p6p7', 'maxpool' or None, "
                             f"got {extra_blocks!r}")
        if p6p7_from not in ("p5", "c5"):
            raise ValueError(f"detectors/backbone.py: p6p7_from must be 'p5' or 'c5', got {p6p7_from!r}")
        self.extra_blocks, self.p6p7_from = extra_blocks, p6p7_from
        self.out_channels = out_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1) for c in in_channels_list)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
                                    for _ in in_channels_list)
        if extra_blocks == "p6p7":
            p6_in = out_channels if p6p7_from == "p5" else in_channels_list[-1]
            self.p6 = nn.Conv2d(p6_in, out_channels, kernel_size=3, stride=2, padding=1)
            self.p7 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    @property
    def num_extra_levels(self) -> int:
        return {"p6p7": 2, "maxpool": 1, None: 0}[self.extra_blocks]

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: maps finest first, each (B, c_l, H_l, W_l) -> outputs (B, out_channels, H_l, W_l), finest
        first, followed by the extra levels (each half the previous size, rounded up)."""
        merged = self.lateral[-1](features[-1])
        outputs = [self.output[-1](merged)]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral[level](features[level])
            merged = lateral + F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output[level](merged))
        if self.extra_blocks == "p6p7":
            p6 = self.p6(outputs[-1] if self.p6p7_from == "p5" else features[-1])
            outputs += [p6, self.p7(F.relu(p6))]
        elif self.extra_blocks == "maxpool":
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs


class ResNetFPN(nn.Module):
    """ResNet body + FPN: normalised images (B, 3, H, W) -> list of maps (B, out_channels, H / s, W / s).

    `levels` are the body outputs fed to the FPN, by pyramid level (2 = C2, ..., 5 = C5); `strides` lists the
    stride of every output map, extra levels included.
    """

    def __init__(self, body: ResNetBody, fpn: FPN, *, levels: tuple[int, ...]):
        super().__init__()
        self.body, self.fpn, self.levels = body, fpn, tuple(levels)
        self.out_channels = fpn.out_channels
        last = self.levels[-1] + fpn.num_extra_levels
        self.strides = tuple(2 ** level for level in range(self.levels[0], last + 1))

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.body(x)  # [C2, C3, C4, C5]
        return self.fpn([features[level - 2] for level in self.levels])


def build_resnet_fpn(name: str, *, out_channels: int = 256, weights: str | Path | None = None,
                     frozen_stages: int = 1, frozen_bn: bool | None = None, levels: tuple[int, ...] = (2, 3, 4, 5),
                     extra_blocks: str | None = "maxpool", p6p7_from: str = "p5") -> ResNetFPN:
    """The detectors' backbone. Defaults are Faster R-CNN's (C2..C5 -> P2..P6 by max-pooling); RetinaNet and
    FCOS pass levels=(3, 4, 5), extra_blocks="p6p7" for P3..P7.

    weights: path of a torchvision ImageNet checkpoint, or None / "" to train from scratch.
    frozen_bn: None means "frozen exactly when pretrained weights are given" (batch statistics of small
        detection batches are too noisy to fine-tune; from scratch, BatchNorm must learn).
    frozen_stages: the stem and this many stages are frozen when pretrained weights are given (torchvision's
        default trainable_layers=3 <-> 1); without weights nothing is frozen, random filters must train.
    """
    pretrained = bool(weights)
    body = build_resnet(name, frozen_stages=-1, frozen_bn=pretrained if frozen_bn is None else frozen_bn)
    if pretrained:
        load_backbone_weights(body, weights)
        body.freeze(frozen_stages)
    fpn = FPN([body.channels[level - 2] for level in levels], out_channels, extra_blocks=extra_blocks,
              p6p7_from=p6p7_from)
    return ResNetFPN(body, fpn, levels=levels)


def torchvision_backbone_key(key: str) -> str:
    """Name of a torchvision detection-model backbone parameter in a model that keeps its ResNetFPN as
    `.backbone` (every detector here does):

        backbone.body.<name>                    -> backbone.body.<name>     (same ResNet module names)
        backbone.fpn.inner_blocks.<i>.0.<p>     -> backbone.fpn.lateral.<i>.<p>
        backbone.fpn.layer_blocks.<i>.0.<p>     -> backbone.fpn.output.<i>.<p>
        backbone.fpn.extra_blocks.p6|p7.<p>     -> backbone.fpn.p6|p7.<p>
    """
    parts = key.split(".")
    if parts[:2] == ["backbone", "body"]:
        return key
    if parts[:2] == ["backbone", "fpn"]:
        if parts[2] in ("inner_blocks", "layer_blocks") and len(parts) == 6 and parts[4] == "0":
            ours = "lateral" if parts[2] == "inner_blocks" else "output"
            return f"backbone.fpn.{ours}.{parts[3]}.{parts[5]}"
        if parts[2] == "extra_blocks" and parts[3] in ("p6", "p7") and len(parts) == 5:
            return f"backbone.fpn.{parts[3]}.{parts[4]}"
    raise KeyError(f"detectors/backbone.py: no mapping for torchvision backbone key {key!r}")


def load_renamed_state_dict(model: nn.Module, state_dict: dict[str, Tensor], *, rename) -> None:
    """Load another implementation's weights into `model`, every key renamed by `rename(key) -> our key`
    (which raises on a key it cannot map). BatchNorm's num_batches_tracked is dropped where this model has
    frozen BatchNorm, which has none. Raises on any key missing or left over."""
    own = model.state_dict()
    mapped = {}
    for key, value in state_dict.items():
        ours = rename(key)
        if ours.endswith("num_batches_tracked") and ours not in own:
            continue
        mapped[ours] = value
    model.load_state_dict(mapped, strict=True)
