"""The small classifiers of Chapter 3, as plain ``nn.Module`` builders.

Tiny profile (8x8 scikit-learn digits, Iris, generated Gaussians): every model has at most a
few thousand parameters so its exact Hessian is affordable on one CPU thread.
Paper profile (28x28 MNIST, 32x32 CIFAR-10): the architectures of Table 3.1.

No BatchNorm in the tiny models: influence reweights samples, and batch statistics would make
the loss of one sample depend on the others. The paper-profile VGG/ResNet keep BatchNorm as
published: trained in train mode (batch statistics), influence is computed on them in eval mode
(the trained running statistics, frozen).

    logistic_regression(d_in, n_classes)           linear; one logit when n_classes == 2
    mlp(d_in, n_classes, width, depth, activation)  depth hidden layers of equal width
    small_cnn(in_ch, n_classes, channels)           all-convolutional, 6 conv layers (Koh & Liang)
    lenet(in_ch, n_classes, image)                  LeNet-5 style, tanh + average pooling
    tiny_resnet(in_ch, n_classes, channels)         2 residual blocks, no normalisation
    tiny_vgg(in_ch, n_classes, channels)            VGG-style 3x3 conv stacks + max pooling
    vgg(name, in_ch, n_classes)                     VGG13 / VGG14 with BatchNorm (paper)
    resnet(name, in_ch, n_classes)                  torchvision ResNet18 / 50, CIFAR stem (paper)
"""
from torch import nn

from ..errors import check_choice

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}


def logistic_regression(d_in: int, n_classes: int = 2) -> nn.Module:
    """(N, d_in) -> (N, 1) logit for two classes, (N, C) logits otherwise."""
    return nn.Linear(d_in, 1 if n_classes == 2 else n_classes)


def mlp(d_in: int, n_classes: int, width: int = 5, depth: int = 1, activation: str = "relu") -> nn.Module:
    """Feed-forward net: (N, ...) flattened to (N, d_in) -> (N, n_classes); depth hidden layers."""
    check_choice("activation", activation, tuple(ACTIVATIONS))
    layers, d = [nn.Flatten()], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), ACTIVATIONS[activation]()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, n_classes))


def small_cnn(in_ch: int = 1, n_classes: int = 10, channels: int = 8, activation: str = "tanh") -> nn.Module:
    """All-convolutional net of Koh & Liang (after Springenberg et al.): six conv layers.

    3x3 convs (the 2nd and 4th with stride 2), a 1x1 conv to class scores, global average
    pooling. channels=8 on 28x28 MNIST gives 2,506 parameters (the "2,600-parameter" CNN);
    channels=4 on 8x8 digits gives 682. (N, in_ch, H, W) -> (N, n_classes).
    """
    act = ACTIVATIONS[activation]
    c = channels
    return nn.Sequential(
        nn.Conv2d(in_ch, c, 3, padding=1), act(),
        nn.Conv2d(c, c, 3, stride=2, padding=1), act(),
        nn.Conv2d(c, c, 3, padding=1), act(),
        nn.Conv2d(c, c, 3, stride=2, padding=1), act(),
        nn.Conv2d(c, c, 3, padding=1), act(),
        nn.Conv2d(c, n_classes, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


def lenet(in_ch: int = 1, n_classes: int = 10, image: int = 28) -> nn.Module:
    """LeNet-5 style: conv-tanh-avgpool twice, then three fully connected layers.

    image 28 (MNIST, 5x5 convs, no padding): 44k parameters as in the text; image 32 (CIFAR-10):
    62k; image 8 (digits): 3x3 padded convs with 4 and 8 channels and one hidden layer of 12,
    862 parameters. (N, in_ch, image, image) -> (N, n_classes).
    """
    if image == 8:
        return nn.Sequential(
            nn.Conv2d(in_ch, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * 2 * 2, 12), nn.Tanh(), nn.Linear(12, n_classes))
    side = ((image - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, 6, 5), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, n_classes))


class _Residual(nn.Module):
    """x + conv(act(conv(x))) with no normalisation (sample weights stay separable)."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.Tanh(), nn.Conv2d(c, c, 3, padding=1))
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(x + self.body(x))


def tiny_resnet(in_ch: int = 1, n_classes: int = 10, channels: int = 4, blocks: int = 2) -> nn.Module:
    """Two stride-2 convs (8x8 -> 2x2 on digits), ``blocks`` residual blocks, pooling, linear head.

    The deepest tiny model: 3 + 2 * blocks weight layers with skip connections; channels=4 and
    2 blocks: 830 parameters. (N, in_ch, H, W) -> (N, n_classes).
    """
    c = channels
    return nn.Sequential(nn.Conv2d(in_ch, c, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Conv2d(c, c, 3, stride=2, padding=1), nn.Tanh(),
                         *[_Residual(c) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_classes))


def tiny_vgg(in_ch: int = 1, n_classes: int = 10, channels: int = 4) -> nn.Module:
    """VGG-style: two 3x3 conv layers per block, max pooling, two blocks, linear head (8x8 input)."""
    c = channels
    return nn.Sequential(
        nn.Conv2d(in_ch, c, 3, padding=1), nn.Tanh(), nn.Conv2d(c, c, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.Tanh(), nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.Tanh(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * c * 2 * 2, n_classes))


# -- paper profile ----------------------------------------------------------------------
VGG_CONFIGS = {
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    # VGG14 is not a standard network: VGG13 with one more 3x3, 512-channel conv in its last
    # block (11 conv + 3 linear = 14 weight layers).
    "vgg14": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, 512, "M"],
}


def vgg(name: str = "vgg13", in_ch: int = 3, n_classes: int = 10, image: int = 32) -> nn.Module:
    """VGG13 / VGG14 with BatchNorm for 28x28 or 32x32 inputs; 3 linear layers of width 512.

    28x28 MNIST loses its last pooling stage (28 -> 14 -> 7 -> 3 -> 1 after four pools).
    """
    check_choice("name", name, tuple(VGG_CONFIGS))
    cfg = list(VGG_CONFIGS[name])
    if image == 28:
        cfg = cfg[:-1]  # four pools take 28 to 1; a fifth would be empty
    layers, c = [], in_ch
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 512), nn.ReLU(inplace=True),
                         nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, n_classes))


def resnet(name: str = "resnet18", in_ch: int = 3, n_classes: int = 10) -> nn.Module:
    """torchvision ResNet18 / ResNet50 adapted to 28-32 px: 3x3 stride-1 stem, no max pool."""
    import torchvision

    check_choice("name", name, ("resnet18", "resnet50"))
    net = getattr(torchvision.models, name)(weights=None, num_classes=n_classes)
    net.conv1 = nn.Conv2d(in_ch, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def imagenet_resnet50(pretrained: bool = True) -> nn.Module:
    """torchvision's ResNet-50 with its IMAGENET1K_V1 weights (top-5 92.862 %; §3.10.4's model was trained
    to 92.302 %), in eval mode. ``pretrained=False``: the architecture with random weights. The weights
    come from torchvision's cache (TORCH_HOME); offline without them: ResourceUnavailable."""
    import torchvision
    if not pretrained:
        return torchvision.models.resnet50(weights=None).eval()
    try:
        return torchvision.models.resnet50(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V1).eval()
    except Exception as err:  # no network and nothing cached
        from ..errors import resource_unavailable
        raise resource_unavailable(f"torchvision's ResNet-50 IMAGENET1K_V1 weights ({type(err).__name__})",
                                   "fetch them once with torchvision on a machine with internet and set TORCH_HOME") from None


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def paper_model(name: str, dataset: str = "mnist") -> nn.Module:
    """The Table 3.1 architectures: small_cnn, lenet, vgg13, vgg14, resnet18, resnet50."""
    check_choice("dataset", dataset, ("mnist", "cifar10"))
    in_ch, image = (1, 28) if dataset == "mnist" else (3, 32)
    builders = {"small_cnn": lambda: small_cnn(in_ch, 10, channels=8),
                "lenet": lambda: lenet(in_ch, 10, image),
                "vgg13": lambda: vgg("vgg13", in_ch, 10, image),
                "vgg14": lambda: vgg("vgg14", in_ch, 10, image),
                "resnet18": lambda: resnet("resnet18", in_ch, 10),
                "resnet50": lambda: resnet("resnet50", in_ch, 10)}
    check_choice("name", name, tuple(builders))
    return builders[name]()


TINY_MODELS = ("small_cnn", "resnet", "lenet", "mlp", "vgg")


def tiny_model(name: str, n_classes: int = 10) -> nn.Module:
    """The tiny Table 3.1 set on 8x8 digits, smallest first: small_cnn (682 parameters, 6 conv
    layers), resnet (830, 6 conv layers + 1 linear, skips), lenet (862), mlp (2 x 10 tanh, 870),
    vgg (1,398)."""
    builders = {"small_cnn": lambda: small_cnn(1, n_classes, channels=4),
                "mlp": lambda: mlp(64, n_classes, width=10, depth=2, activation="tanh"),
                "lenet": lambda: lenet(1, n_classes, image=8),
                "resnet": lambda: tiny_resnet(1, n_classes, channels=4),
                "vgg": lambda: tiny_vgg(1, n_classes, channels=4)}
    check_choice("name", name, tuple(builders))
    return builders[name]()
