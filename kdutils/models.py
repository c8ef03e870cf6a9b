"""The networks of the book (introduced in chapter 2).

``DeepNN`` (the teacher) and ``LightNN`` (the student) are R5's two CNNs, layer for layer.
Both split into ``features`` (the convolutional part) and ``classifier`` (the head), and
``forward(x, return_features=True)`` also returns the last feature map, which the
cosine (chapter 4) and hint (chapter 5) losses need: no copies of the classes.
"""
from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

from . import settings


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)


class _FeaturesThenHead(nn.Module):
    features: nn.Module
    classifier: nn.Module

    def forward(self, x: torch.Tensor, return_features: bool = False):
        h = self.features(x)
        logits = self.classifier(torch.flatten(h, 1))
        return (logits, h) if return_features else logits


class DeepNN(_FeaturesThenHead):
    """R5's teacher: 4 convolutions (128, 64, 64, 32 channels), 2 max-pools, a 512-unit head.

    Feature map: ``(N, 32, 8, 8)`` = 2048 values. 1,186,986 parameters. Dropout is 0.1, as
    intended; R5 wrote ``nn.Dropout(0, 1)``, which is p=0 (no dropout) with inplace=True.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            _conv(3, 128), nn.ReLU(), _conv(128, 64), nn.ReLU(), nn.MaxPool2d(2),
            _conv(64, 64), nn.ReLU(), _conv(64, 32), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Linear(2048, 512), nn.ReLU(), nn.Dropout(0.1), nn.Linear(512, num_classes))


class LightNN(_FeaturesThenHead):
    """R5's student: 2 convolutions (16 channels each), 2 max-pools, a 256-unit head.

    Feature map: ``(N, 16, 8, 8)`` = 1024 values. 267,738 parameters.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            _conv(3, 16), nn.ReLU(), nn.MaxPool2d(2), _conv(16, 16), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Linear(1024, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, num_classes))


MODELS = {"deepnn": DeepNN, "lightnn": LightNN}


def build(name: str, *, seed: int | None = None, num_classes: int = 10) -> nn.Module:
    """A fresh model by name; with ``seed``, its initial weights follow from that seed alone.

    Two calls with the same name and seed give identical weights (chapter 2 checks it).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        net = MODELS[name](num_classes)
    net.arch = name  # the name run records give the network ("resnet18", not "ResNet")
    return net


def arch_name(model: nn.Module) -> str:
    """The book's name of a network: the name it was built by (:func:`build`), else its class
    name in lower case."""
    return getattr(model, "arch", type(model).__name__.lower())


def builders(model: nn.Module) -> list:
    """The :data:`MODELS` entries that built ``model`` and the networks inside it (a student
    wrapped with a regressor, say): what made a network whose class is a library's."""
    return [MODELS[m.arch] for m in model.modules() if getattr(m, "arch", None) in MODELS]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_image(model: nn.Module, image_size: int = 32) -> int:
    """Floating-point operations of one forward pass on one image (``torch.utils.flop_counter``).

    Counts a multiply-add as 2 FLOPs, over convolutions and matrix products.
    """
    from torch.utils.flop_counter import FlopCounterMode
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return counter.get_total_flops()


# ---- Part II: ResNets with a CIFAR stem ------------------------------------------------------

def cifar_resnet(depth: int = 18, num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet18/34/50 with the CIFAR stem: 3x3 stride-1 conv, no max-pool.

    The stem is replaced while the network is built, before any weights are loaded: loading
    first and replacing the stem afterwards (as R2 did) throws the loaded stem away.
    """
    import torchvision
    builders = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34,
                50: torchvision.models.resnet50}
    if depth not in builders:
        raise ValueError(f"unknown ResNet depth {depth}; known: {', '.join(map(str, builders))}")
    net = builders[depth](weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class MultiExitResNet18(nn.Module):
    """R1's self-distillation ResNet18 ("Be Your Own Teacher"): four exits, one per stage.

    After each stage (64, 128, 256, 512 channels) a bottleneck (1x1 conv to 256 channels with
    bias, then BN, no ReLU) gives a feature map ``h_i``; global average pooling and a
    ``Linear(256, num_classes)`` give the exit's logits ``p_i``. ``forward`` returns
    ``([p1, p2, p3, p4], [h1, h2, h3, h4])``; exit 4 is the deepest.
    """

    def __init__(self, num_classes: int = 10, width: int = 256):
        super().__init__()
        base = cifar_resnet(18, num_classes)
        self.stem = nn.Sequential(base.conv1, base.bn1, base.relu)
        self.stages = nn.ModuleList([base.layer1, base.layer2, base.layer3, base.layer4])
        self.bottlenecks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, kernel_size=1), nn.BatchNorm2d(width))
            for c in (64, 128, 256, 512))
        self.heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(4))

    def forward(self, x):
        logits, feats = [], []
        x = self.stem(x)
        for stage, bottleneck, head in zip(self.stages, self.bottlenecks, self.heads):
            x = stage(x)
            h = bottleneck(x)
            feats.append(h)
            logits.append(head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)))
        return logits, feats


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (no network and no cached copy)."""


def pretrained_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ImageNet-pretrained ResNet18 (``IMAGENET1K_V1``) with a new
    ``Linear(512, num_classes)`` head (R4, R3). Raises :class:`WeightsUnavailable` with what
    to do when the weights cannot be downloaded and are not in torch's cache."""
    import torchvision
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    try:   # torch announces the download with the cache's full path (on stdout): not on a page
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            net = torchvision.models.resnet18(weights=weights)
    except Exception as e:  # URLError, socket errors, proxy errors, a truncated file...
        raise WeightsUnavailable(
            f"the ImageNet weights of ResNet18 ({weights.url}) could not be loaded "
            f"({type(e).__name__}). Either put the file in "
            f"{settings.shown_path(torch.hub.get_dir())}/checkpoints/ "
            "(torch's cache), or set teacher_weights='none' to train the teacher from scratch "
            "on the chapter's data.") from None
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


class HeadOnly(nn.Module):
    """A pretrained network whose backbone stays frozen (eval mode, no gradients): only the
    new head ``fc`` trains. ``train()`` keeps the backbone's BatchNorm statistics fixed, which
    freezing ``requires_grad`` alone does not do (R4)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        for name, p in net.named_parameters():
            p.requires_grad_(name.startswith("fc."))

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        self.net.fc.train(mode)
        return self

    def forward(self, x):
        return self.net(x)


class SmallCNN(_FeaturesThenHead):
    """R4's student ("DeeperStudentCNN"): 3x3 convolutions 32, 32, pool, 64, 64, pool,
    128, 128, pool, 256, pool (ReLU, no BatchNorm), then ``Linear(256 * (s/16)^2, 256)``,
    ReLU, ``Linear(256, classes)``. At 224 px the last map is 14x14; at 32 px, 2x2."""

    def __init__(self, num_classes: int = 10, image_size: int = 224):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (four 2x2 poolings), got {image_size}")
        layers, cin = [], 3
        for block in ((32, 32), (64, 64), (128, 128), (256,)):
            for cout in block:
                layers += [_conv(cin, cout), nn.ReLU()]
                cin = cout
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = image_size // 16
        self.classifier = nn.Sequential(nn.Linear(256 * side * side, 256), nn.ReLU(),
                                        nn.Linear(256, num_classes))


MODELS.update({"resnet18": lambda num_classes=10: cifar_resnet(18, num_classes),
               "resnet50": lambda num_classes=10: cifar_resnet(50, num_classes),
               "resnet18_multiexit": MultiExitResNet18,
               # R4's teacher: ImageNet weights, frozen backbone, new head (needs the weights)
               "resnet18_pretrained": lambda num_classes=10: HeadOnly(pretrained_resnet18(num_classes)),
               # its from-scratch fallback at ImageNet-like sizes (standard stem)
               "resnet18_imagenet_stem": lambda num_classes=10: __import__("torchvision").models.resnet18(
                   weights=None, num_classes=num_classes)})
