"""The model zoo: CIFAR-style classifiers by name.

    from fakecifar.models import build_model, list_models
    model = build_model("resnet20", num_classes=10)

Every model takes `num_classes` and ends in global average pooling, so it runs on any input
of 32 px or more. Every model also has `forward_features(x)` -> pooled features [N, F] (what
the classifier head sees), which feature-based distillation needs.

RepVGG models train with 3x3 + 1x1 + identity branches; `reparameterize(model)` fuses them
into one 3x3 conv per block (same outputs in eval mode) and sets `model.deploy = True`; build
with `deploy=True` to get the fused layout directly, e.g. to load a fused checkpoint.

Gated ResNets (`gated-resnet20/32/56`, `gated-resnet18`) are dynamic networks in the style of
ConvNet-AIG (Veit & Belongie 2018): every residual block has a tiny gate (global average pool
of the block input -> linear -> ReLU -> linear -> 2 logits, skip/execute) that decides per
input whether the block runs: output = relu(shortcut(x) + gate * residual(x)). In training the
decision is a straight-through Gumbel-softmax sample (hard 0/1 forward, soft gradient; torch's
default RNG), in eval the argmax (deterministic, and it exports to ONNX as a 0/1 product).
Gates start open. The training code uses them through a duck-typed API, no class checks:

    model.gate_loss()   # scalar: gate_weight * mean over blocks of (execution rate - gate_target)^2
                        # over the last forward pass (AIG's target-rate loss; differentiable in
                        # training); add it to the task's loss
    model.gate_rates()  # list[float]: each block's execution rate in the last forward pass
    model.gate_stages   # list[int]: blocks per stage, for gate_pattern
    is_gated(model)     # has that API
    gate_pattern(model.gate_rates(), model.gate_stages)  # e.g. 'xxx|-x-|xx-'
    gate_report(model, images)  # eval-mode forward on `images`, then the pattern and mean rate

Build options: `gate_target` (default 0.6, the target execution rate) and `gate_weight`
(default 2.0, AIG's weight for the target loss).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

__all__ = [
    "MODELS",
    "ModelSpec",
    "build_model",
    "count_params",
    "gate_pattern",
    "gate_report",
    "is_gated",
    "find_stage",
    "list_models",
    "model_spec",
    "normalize_name",
    "reparameterize",
    "resolve_name",
]


# ----------------------------------------------------------------------------- helpers


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


# ----------------------------------------------------------------------------- ResNet


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut of He et al.: subsample by `stride`, pad channels with zeros.

    No parameters. The padding goes half before, half after the input channels, the layout
    the pretrained ResNet-CIFAR weights were trained with.
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_before = (planes - in_planes) // 2
        self.pad_after = planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; shortcut "A" (zero padding, no params) or "B" (1x1 conv + BN)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = ZeroPadShortcut(in_planes, planes, stride)
            else:
                self.shortcut = _conv_bn(in_planes, planes, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al. 2016, sec. 4.2): 16/32/64 channels, option-A shortcuts.

    Module names match the widely used pretrained files (conv1, bn1, layer1..3, linear).
    """

    block_type: type[BasicBlock] = BasicBlock  # a subclass swaps in its own (the gated ResNets)

    def __init__(
        self, depth: int, num_classes: int = 10, stem_stride: int = 1, stage_strides: Sequence[int] = (1, 2, 2)
    ):
        super().__init__()
        if (depth - 2) % 6:
            raise UsageError(f"ResNet-CIFAR depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        if len(stage_strides) != 3 or stem_stride not in (1, 2) or any(v not in (1, 2) for v in stage_strides):
            raise UsageError(
                f"ResNet-CIFAR takes stem_stride 1 or 2 and three stage_strides of 1 or 2, got {stem_stride}, "
                f"{tuple(stage_strides)}"
            )
        self.conv1 = nn.Conv2d(3, 16, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        layers = []
        for width, stride in zip((16, 32, 64), stage_strides):
            blocks = []
            for i in range(n):
                blocks.append(self.block_type(planes, width, stride if i == 0 else 1, shortcut="A"))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.num_features = 64
        self.linear = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool) and 1x1-conv shortcuts;
    `blocks` per stage (3, 4, 6, 3) make the ResNet-34 of the data-free papers' teachers."""

    block_type: type[BasicBlock] = BasicBlock  # a subclass swaps in its own (the gated ResNets)

    def __init__(self, num_classes: int = 10, blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        planes = 64
        layers = []
        for (width, stride), count in zip(((64, 1), (128, 2), (256, 2), (512, 2)), blocks):
            stage = [self.block_type(planes, width, stride)] + [self.block_type(width, width) for _ in range(count - 1)]
            layers.append(nn.Sequential(*stage))
            planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.num_features = 512
        self.linear = nn.Linear(512, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


# ----------------------------------------------------------------------------- gated ResNet (ConvNet-AIG)


class BlockGate(nn.Module):
    """The per-input skip/execute decision of one block (ConvNet-AIG): global average pool ->
    linear -> ReLU -> linear -> logits [skip, execute]. Returns [N] floats, each 0 or 1.

    Training: a straight-through Gumbel-softmax sample (hard 0/1 forward, the soft sample's
    gradient; torch's default RNG). Eval: the argmax, deterministic. Unlike AIG's head there is
    no BatchNorm between the linears: it would fail on a training batch of one image.
    """

    def __init__(self, channels: int, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 2)
        # AIG's start: the execute logit 1.9 above skip, so ~87% of Gumbel samples execute and
        # the argmax executes every block; small weights keep the input from overriding that.
        nn.init.normal_(self.fc2.weight, std=0.01)
        with torch.no_grad():
            self.fc2.bias.copy_(torch.tensor([0.1, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc2(F.relu(self.fc1(x.mean((2, 3))))).float()  # float: Gumbel noise in bf16 is coarse
        if self.training:
            return F.gumbel_softmax(logits, tau=1.0, hard=True)[:, 1]
        return (logits[:, 1] > logits[:, 0]).float()  # a tie skips, as argmax picks index 0


class GatedBlock(BasicBlock):
    """A BasicBlock whose residual branch is scaled by its gate: relu(shortcut(x) + g * F(x)).

    The branch is computed for every input (a 0/1 product, so it traces and exports to ONNX);
    a skipped block passes its input on through the shortcut (identity, or option A / B when
    it downsamples). `gated(x)` -> (output, gate); `forward` drops the gate.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__(in_planes, planes, stride, shortcut)
        self.gate = BlockGate(in_planes)

    def gated(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = self.gate(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) * gate.to(out.dtype).view(-1, 1, 1, 1)
        return F.relu(out + self.shortcut(x)), gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gated(x)[0]


class _LastGates:
    """The gate tensors of the last forward pass. A deep copy or a pickle comes out empty: the
    tensors belong to an autograd graph, which deepcopy refuses (EMA and export_onnx copy models)."""

    def __init__(self) -> None:
        self.gates: list[torch.Tensor] = []

    def __deepcopy__(self, memo: dict) -> _LastGates:
        return _LastGates()

    def __reduce__(self) -> tuple:
        return (_LastGates, ())


class _GateAPI:
    """What the gated ResNets share: running stages of GatedBlocks, and the gate API of the
    module docstring (gate_loss, gate_rates, gate_stages)."""

    gate_target: float
    gate_weight: float
    gate_stages: list[int]
    _last_gates: _LastGates

    def _setup_gates(self, stages: Sequence[nn.Sequential], gate_target: float, gate_weight: float) -> None:
        if not 0.0 <= gate_target <= 1.0:
            raise UsageError(f"gate_target is an execution rate in [0, 1], got {gate_target!r}")
        if not 0.0 <= gate_weight < float("inf"):
            raise UsageError(f"gate_weight must be finite and at least 0, got {gate_weight!r}")
        self.gate_target, self.gate_weight = float(gate_target), float(gate_weight)
        self.gate_stages = [len(stage) for stage in stages]
        self._last_gates = _LastGates()

    def _run_stages(self, stages: Sequence[nn.Sequential], x: torch.Tensor) -> torch.Tensor:
        gates = []
        for stage in stages:
            for block in stage:
                assert isinstance(block, GatedBlock)
                x, gate = block.gated(x)
                gates.append(gate)
        self._last_gates.gates = gates
        return x

    def gate_loss(self) -> torch.Tensor:
        """AIG's target-rate loss over the last forward pass: gate_weight * mean over blocks of
        (execution rate - gate_target)^2; differentiable after a training forward. 0 before any."""
        gates = self._last_gates.gates
        if not gates:
            return torch.zeros(())
        rates = torch.stack([g.float().mean() for g in gates])
        return self.gate_weight * (rates - self.gate_target).square().mean()

    def gate_rates(self) -> list[float]:
        """The execution rate of each block (fraction of the batch it ran on) in the last forward pass."""
        gates = self._last_gates.gates
        if not gates:
            return []
        return [float(r) for r in torch.stack([g.detach().float().mean() for g in gates]).tolist()]


class GatedResNetCifar(_GateAPI, ResNetCifar):
    """ResNet-(6n+2) for CIFAR with a ConvNet-AIG gate on every block (see the module docstring).

    Module names are those of ResNetCifar plus `layerK.I.gate`, so a plain ResNet's weights
    load with strict=False (the gates keep their open start)."""

    block_type = GatedBlock

    def __init__(self, depth: int, num_classes: int = 10, gate_target: float = 0.6, gate_weight: float = 2.0):
        super().__init__(depth, num_classes)
        self._setup_gates((self.layer1, self.layer2, self.layer3), gate_target, gate_weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self._run_stages((self.layer1, self.layer2, self.layer3), out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class GatedResNet18Cifar(_GateAPI, ResNet18Cifar):
    """ResNet-18 (CIFAR stem) with a ConvNet-AIG gate on every block (see the module docstring)."""

    block_type = GatedBlock

    def __init__(self, num_classes: int = 10, gate_target: float = 0.6, gate_weight: float = 2.0):
        super().__init__(num_classes)
        self._setup_gates((self.layer1, self.layer2, self.layer3, self.layer4), gate_target, gate_weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self._run_stages((self.layer1, self.layer2, self.layer3, self.layer4), out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def is_gated(model: nn.Module) -> bool:
    """Whether `model` has the gate API (gate_loss and gate_rates) of the module docstring."""
    return callable(getattr(model, "gate_loss", None)) and callable(getattr(model, "gate_rates", None))


def gate_pattern(rates: Sequence[float], stages: Sequence[int] | None = None) -> str:
    """One mark per block: 'x' executed on at least half the inputs, '-' mostly skipped. With
    `stages` (blocks per stage, summing to len(rates)) a '|' separates the stages:
    gate_pattern([1, 0.9, 0.2, 1, 0, 1], [3, 3]) == 'xx-|x-x'."""
    marks = "".join("x" if r >= 0.5 else "-" for r in rates)
    if stages is None:
        return marks
    if any(n < 0 for n in stages) or sum(stages) != len(marks):
        raise ValueError(f"stages {list(stages)} do not add up to the {len(marks)} blocks")
    parts, start = [], 0
    for n in stages:
        parts.append(marks[start : start + n])
        start += n
    return "|".join(parts)


@torch.no_grad()
def gate_report(model: nn.Module, images: torch.Tensor) -> str:
    """The gate pattern of a gated `model` in eval mode on `images` (normalized [N,3,H,W], on
    the model's device) and its mean execution rate, e.g. 'xxx|-x-|xx- (mean rate 0.67)'. The
    model's train/eval mode is left as it was."""
    if not is_gated(model):
        raise ValueError(f"{type(model).__name__} has no gates")
    gated: Any = model  # the duck-typed gate API
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
    rates = gated.gate_rates()
    mean = sum(rates) / max(len(rates), 1)
    return f"{gate_pattern(rates, getattr(model, 'gate_stages', None))} (mean rate {mean:.2f})"


# ----------------------------------------------------------------------------- Wide ResNet


class WideBlock(nn.Module):
    """Pre-activation block of Zagoruyko & Komodakis (2016), optional dropout between convs."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        # A projecting shortcut sees the pre-activated input, as in the reference WRN.
        return out + (self.shortcut(act) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-d-k: depth d = 6n+4, widths 16k/32k/64k."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise UsageError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        planes = 16
        groups = []
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(WideBlock(planes, width, stride if i == 0 else 1, dropout))
                planes = width
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(planes)
        self.num_features = planes
        self.linear = nn.Linear(planes, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


# ----------------------------------------------------------------------------- VGG

_VGG_CFG: dict[int, list[int | str]] = {
    # VGG-8 as in the distillation literature (CRD and after): five single-conv stages.
    8: [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG with BatchNorm and a single linear classifier (the usual CIFAR variant)."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG_CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(cin, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        self.linear = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


# ----------------------------------------------------------------------------- RepVGG


def _fuse_conv_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The (kernel, bias) of conv-without-bias followed by `bn` in eval mode, in float64."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    kernel = weight.double() * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias.double() - bn.running_mean.double() * scale
    return kernel, bias


class RepVGGBlock(nn.Module):
    """3x3 conv-BN + 1x1 conv-BN (+ identity BN when shapes allow), then ReLU (Ding et al. 2021).

    `fuse_()` folds the branches into a single biased 3x3 conv (`self.reparam`).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, deploy: bool = False):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.reparam: nn.Conv2d | None = None
        self.dense: nn.Sequential | None = None
        self.pointwise: nn.Sequential | None = None
        self.identity: nn.BatchNorm2d | None = None
        if deploy:
            self.reparam = nn.Conv2d(cin, cout, 3, stride, 1, bias=True)
        else:
            self.dense = _conv_bn(cin, cout, 3, stride)
            self.pointwise = _conv_bn(cin, cout, 1, stride)
            if cin == cout and stride == 1:
                self.identity = nn.BatchNorm2d(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam is not None:
            return F.relu(self.reparam(x))
        assert self.dense is not None and self.pointwise is not None
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return F.relu(out)

    @torch.no_grad()
    def fuse_(self) -> None:
        if self.reparam is not None:
            return
        assert self.dense is not None and self.pointwise is not None
        (dense, dense_bn), (pointwise, pointwise_bn) = self.dense, self.pointwise
        assert isinstance(dense, nn.Conv2d) and isinstance(pointwise, nn.Conv2d)
        assert isinstance(dense_bn, nn.BatchNorm2d) and isinstance(pointwise_bn, nn.BatchNorm2d)
        kernel, bias = _fuse_conv_bn(dense.weight, dense_bn)
        k1, b1 = _fuse_conv_bn(pointwise.weight, pointwise_bn)
        kernel = kernel + F.pad(k1, (1, 1, 1, 1))  # a 1x1 kernel is a 3x3 one with zero ring
        bias = bias + b1
        if self.identity is not None:
            eye = torch.zeros(self.cout, self.cin, 3, 3, dtype=torch.float64, device=kernel.device)
            eye[torch.arange(self.cin), torch.arange(self.cin), 1, 1] = 1.0
            ki, bi = _fuse_conv_bn(eye, self.identity)
            kernel, bias = kernel + ki, bias + bi
        ref = dense.weight
        conv = nn.Conv2d(self.cin, self.cout, 3, self.stride, 1, bias=True).to(ref.device, ref.dtype)
        conv.weight.copy_(kernel.to(ref.dtype))
        assert conv.bias is not None
        conv.bias.copy_(bias.to(ref.dtype))
        self.reparam = conv
        self.dense = self.pointwise = self.identity = None


class RepVGG(nn.Module):
    """RepVGG-A for CIFAR: stride-1 stem and first stage, so 32 px ends at 4x4 before pooling."""

    def __init__(
        self,
        num_blocks: Sequence[int],
        width_multiplier: Sequence[float],
        num_classes: int = 10,
        deploy: bool = False,
    ):
        super().__init__()
        a, b = width_multiplier
        widths = (int(64 * a), int(128 * a), int(256 * a), int(512 * b))
        self.deploy = deploy
        self.stage0 = RepVGGBlock(3, min(64, int(64 * a)), 1, deploy)
        cin = self.stage0.cout
        stages = []
        for width, n, stride in zip(widths, num_blocks, (1, 2, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(RepVGGBlock(cin, width, stride if i == 0 else 1, deploy))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.num_features = cin
        self.linear = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage0(x)
        out = self.stage4(self.stage3(self.stage2(self.stage1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


# ----------------------------------------------------------------------------- MobileNetV2


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += [_conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with the CIFAR stem: stride-1 first conv and stage 2."""

    # (expansion t, channels c, repeats n, stride s); stage 2 stride 2 -> 1 for 32 px inputs.
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.0):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_bn(3, cin, 3, 1), nn.ReLU6(inplace=True)]
        for t, c, n, s in self.CFG:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += [_conv_bn(cin, last, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.num_features = last
        self.linear = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(self.forward_features(x)))


# ----------------------------------------------------------------------------- LeNet-5


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) on RGB with ReLU and max-pooling; 5x5 adaptive pool for >32 px."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.num_features = 84
        self.linear = nn.Linear(84, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 5), 1)  # identity at 32 px
        return F.relu(self.fc2(F.relu(self.fc1(out))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


# ----------------------------------------------------------------------------- PCA + logistic regression


class PCALogReg(nn.Module):
    """The CIFAKE paper's baseline: PCA to `components` dimensions, then logistic regression.

    The PCA basis comes from data, not gradients: `fit_unsupervised(batches)` computes it
    (`fakecifar train` calls it before the first epoch); the linear head is then trained as
    usual (softmax cross-entropy = multinomial logistic regression). Projections are whitened
    so plain SGD converges. Linear end to end, so it exports to ONNX.
    """

    needs_fit = True
    pca_mean: torch.Tensor  # buffers, declared so that type checkers know them
    pca_basis: torch.Tensor
    fitted: torch.Tensor

    def __init__(
        self,
        num_classes: int = 2,
        components: int = 100,
        input_size: int | Sequence[int] = 32,
        fit_images: int = 20_000,
    ):
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        dim = 3 * h * w
        self.components, self.input_size, self.fit_images = components, (h, w), fit_images
        self.register_buffer("pca_mean", torch.zeros(dim))
        self.register_buffer("pca_basis", torch.eye(dim)[:components].clone())  # rows: whitened axes
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.num_features = components
        self.linear = nn.Linear(components, num_classes)

    @torch.no_grad()
    def fit_unsupervised(self, batches) -> None:
        """Fit the PCA basis on up to `fit_images` images from an iterable of [B, 3, H, W] tensors."""
        rows, total = [], 0
        for x in batches:
            rows.append(torch.flatten(x.float().cpu(), 1))
            total += len(rows[-1])
            if total >= self.fit_images:
                break
        data = torch.cat(rows)[: self.fit_images].double()
        if len(data) <= self.components:
            raise UsageError(f"pca-logreg needs more than {self.components} images to fit, got {len(data)}")
        mean = data.mean(0)
        # Randomized PCA: the top components of a 3072-dim covariance in seconds on a CPU.
        _, sing, axes = torch.pca_lowrank(data - mean, q=self.components + 10, center=False, niter=4)
        scale = sing[: self.components] / (len(data) - 1) ** 0.5
        self.pca_mean.copy_(mean.float())
        self.pca_basis.copy_((axes[:, : self.components] / scale.clamp_min(1e-6)).T.float())
        self.fitted.fill_(True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.flatten(x, 1) - self.pca_mean) @ self.pca_basis.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture. `builder(num_classes=..., **kwargs)` returns a fresh model."""

    name: str
    builder: Callable[..., nn.Module]
    description: str
    input_size: int = 32
    reparameterizable: bool = False
    gated: bool = False  # has the gate API (module docstring); known without building one

    def build(self, num_classes: int = 10, **kwargs: object) -> nn.Module:
        return build_model(self.name, num_classes, **kwargs)

    def param_count(self, num_classes: int = 10, **kwargs: object) -> int:
        """Parameters of the model as built (train-time branches included), without allocating."""
        with torch.device("meta"):  # shapes only: instant even for 25M-parameter models
            return count_params(self.builder(num_classes=num_classes, **kwargs))


def _resnet_cifar(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, stem_stride: int = 1, stage_strides: Sequence[int] = (1, 2, 2)) -> nn.Module:
        return ResNetCifar(depth, num_classes, int(stem_stride), tuple(int(v) for v in stage_strides))

    return build


def _gated_resnet_cifar(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, gate_target: float = 0.6, gate_weight: float = 2.0) -> nn.Module:
        return GatedResNetCifar(depth, num_classes, gate_target, gate_weight)

    return build


def _vgg(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10) -> nn.Module:
        return VGG(depth, num_classes)

    return build


def _wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
        return WideResNet(depth, widen, num_classes, dropout)

    return build


def _repvgg(blocks: tuple[int, ...], widths: tuple[float, float]) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, deploy: bool = False) -> nn.Module:
        return RepVGG(blocks, widths, num_classes, deploy)

    return build


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("lenet5", LeNet5, "LeNet-5: 2 conv + 3 fc, ReLU and max-pool (62K params)"),
        ModelSpec("resnet20", _resnet_cifar(20), "ResNet-20 for CIFAR, option-A shortcuts (0.27M)"),
        ModelSpec("resnet32", _resnet_cifar(32), "ResNet-32 for CIFAR, option-A shortcuts (0.46M)"),
        ModelSpec("resnet44", _resnet_cifar(44), "ResNet-44 for CIFAR, option-A shortcuts (0.66M)"),
        ModelSpec("resnet56", _resnet_cifar(56), "ResNet-56 for CIFAR, option-A shortcuts (0.85M)"),
        ModelSpec("resnet110", _resnet_cifar(110), "ResNet-110 for CIFAR, option-A shortcuts (1.7M)"),
        ModelSpec("resnet18", ResNet18Cifar, "ResNet-18 with CIFAR stem (3x3 conv, no max-pool) (11.2M)"),
        ModelSpec(
            "resnet34",
            functools.partial(ResNet18Cifar, blocks=(3, 4, 6, 3)),
            "ResNet-34 with CIFAR stem, the data-free papers' teacher (21.3M)",
        ),
        ModelSpec(
            "gated-resnet20",
            _gated_resnet_cifar(20),
            "ResNet-20, AIG gates skip blocks per input (dynamic student); gate_target=0.6, gate_weight=2.0 (0.27M)",
            gated=True,
        ),
        ModelSpec(
            "gated-resnet32",
            _gated_resnet_cifar(32),
            "ResNet-32, AIG gates skip blocks per input (dynamic student); gate_target=0.6, gate_weight=2.0 (0.47M)",
            gated=True,
        ),
        ModelSpec(
            "gated-resnet56",
            _gated_resnet_cifar(56),
            "ResNet-56, AIG gates skip blocks per input (dynamic student); gate_target=0.6, gate_weight=2.0 (0.87M)",
            gated=True,
        ),
        ModelSpec(
            "gated-resnet18",
            GatedResNet18Cifar,
            "ResNet-18, CIFAR stem, AIG gates skip blocks per input; gate_target=0.6, gate_weight=2.0 (11.2M)",
            gated=True,
        ),
        ModelSpec("wrn-16-1", _wrn(16, 1), "Wide ResNet 16-1, pre-activation; dropout=0.0 (0.18M)"),
        ModelSpec("wrn-16-2", _wrn(16, 2), "Wide ResNet 16-2, pre-activation; dropout=0.0 (0.69M)"),
        ModelSpec("wrn-40-2", _wrn(40, 2), "Wide ResNet 40-2, pre-activation; dropout=0.0 (2.2M)"),
        ModelSpec("vgg8", _vgg(8), "VGG-8 with BN, KD-literature student: 5 conv + linear (3.9M)"),
        ModelSpec("vgg11", _vgg(11), "VGG-11 with BN, single linear classifier (9.2M)"),
        ModelSpec("vgg16", _vgg(16), "VGG-16 with BN, single linear classifier (14.7M)"),
        ModelSpec(
            "repvgg-a0",
            _repvgg((2, 4, 14, 1), (0.75, 2.5)),
            "RepVGG-A0, CIFAR stem; reparameterizable; deploy=False (7.8M train-time)",
            reparameterizable=True,
        ),
        ModelSpec(
            "repvgg-a2",
            _repvgg((2, 4, 14, 1), (1.5, 2.75)),
            "RepVGG-A2, CIFAR stem; reparameterizable; deploy=False (26.8M train-time)",
            reparameterizable=True,
        ),
        ModelSpec(
            "pca-logreg",
            PCALogReg,
            "PCA to 100 components + logistic regression, the CIFAKE baseline; fixed input size (1.0K)",
        ),
        ModelSpec(
            "mobilenetv2",
            MobileNetV2,
            "MobileNetV2 with CIFAR stem (stride-1 conv); width_mult=1.0, dropout=0.0 (2.2M)",
        ),
    )
}


# ----------------------------------------------------------------------------- modifiers
# `BASE+MODIFIER[+MODIFIER]` (e.g. resnet20+highpass) is BASE changed where a detector's signal
# may live (issue 14's ablations): fixed-filter branches beside the RGB network, or where the
# ResNet-CIFAR models downsample. The name is the architecture: checkpoints store it and rebuild
# the same model; options (arch kwargs) are the base's.


def _fixed_conv(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, groups: int = 1) -> torch.Tensor:
    """A convolution by fixed filters; stride 1 keeps the size with reflect padding (zeros at the
    border of a normalized image would be a high-frequency edge of their own)."""
    if stride == 1:
        pad = weight.shape[-1] // 2
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect" if min(x.shape[-2:]) > pad else "replicate")
    return F.conv2d(x, weight.to(x.dtype), stride=stride, groups=groups)


class HighPassBranch(nn.Module):
    """Fixed high-pass residuals of each input channel (a 4-neighbour Laplacian and horizontal
    and vertical second differences, the SRM filters' simplest members), at full resolution,
    then a small learned CNN: 9 maps -> 32 -> 32 (stride 2) -> 64 (stride 2) -> global pool."""

    kernels: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        lap = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
        horizontal = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 2.0, -1.0], [0.0, 0.0, 0.0]])
        kernels = torch.stack([lap, horizontal, horizontal.T]) / 4.0  # [3, 3, 3]
        self.register_buffer("kernels", kernels.repeat(3, 1, 1).unsqueeze(1), persistent=False)  # [9, 1, 3, 3]
        self.net = nn.Sequential(
            _conv_bn(9, 32, 3), nn.ReLU(inplace=True), _conv_bn(32, 32, 3, stride=2), nn.ReLU(inplace=True),
            _conv_bn(32, 64, 3, stride=2), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.num_features = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residuals = _fixed_conv(x, self.kernels, groups=3)  # 3 maps per input channel
        return torch.flatten(F.adaptive_avg_pool2d(self.net(residuals), 1), 1)


class DCTBranch(nn.Module):
    """The magnitudes of each channel's 8x8 block DCT (JPEG's transform: generated images and
    photos differ in how their energy spreads over its frequencies), log(1 + |c|), then a small
    learned CNN over the blocks: 192 coefficient maps -> 64 (1x1) -> 64 (3x3) -> global pool.
    Blocks are aligned at the top left; rows and columns past the last whole block are unused."""

    BLOCK = 8
    filters: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        n = self.BLOCK
        k = torch.arange(n, dtype=torch.float64)
        basis = torch.cos(torch.pi * (2 * k.view(1, -1) + 1) * k.view(-1, 1) / (2 * n))  # [freq, pos]
        basis = basis * torch.where(k == 0, (1 / n) ** 0.5, (2 / n) ** 0.5).view(-1, 1)  # orthonormal
        filters = (basis[:, None, :, None] * basis[None, :, None, :]).reshape(n * n, 1, n, n).float()
        self.register_buffer("filters", filters.repeat(3, 1, 1, 1), persistent=False)  # [192, 1, 8, 8]
        self.net = nn.Sequential(
            _conv_bn(3 * n * n, 64, 1), nn.ReLU(inplace=True), _conv_bn(64, 64, 3), nn.ReLU(inplace=True)
        )
        self.num_features = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.BLOCK
        coefficients = _fixed_conv(x, self.filters, stride=n, groups=3)  # n*n maps per input channel
        return torch.flatten(F.adaptive_avg_pool2d(self.net(torch.log1p(coefficients.abs())), 1), 1)


class BranchNet(nn.Module):
    """`body` (a model of this zoo, its own classifier removed) with branches beside it that see
    the same input; their pooled features are concatenated before one linear classifier."""

    body: Any  # a zoo model: forward_features, num_features

    def __init__(self, body: nn.Module, branches: Sequence[nn.Module], num_classes: int):
        super().__init__()
        self.body = body
        self.body.linear = nn.Identity()  # unused: its parameters would get no gradient (DDP)
        self.branches = nn.ModuleList(branches)
        parts: list[Any] = [body, *branches]  # zoo models and branches: each has num_features
        widths = [int(m.num_features) for m in parts]
        self.num_features = sum(widths)
        self.linear = nn.Linear(self.num_features, num_classes)
        for part in (*self.branches, self.linear):
            _init_weights(part)  # as the body's

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.body.forward_features(x), *(branch(x) for branch in self.branches)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


BRANCHES: dict[str, type[nn.Module]] = {"highpass": HighPassBranch, "dct": DCTBranch}
# Downsampling changes of the ResNet-CIFAR models: their builder arguments.
DOWNSAMPLING: dict[str, dict[str, Any]] = {
    "stem2": {"stem_stride": 2},  # early downsampling: 16x16 from the first conv on
    "hires": {"stage_strides": (1, 1, 2)},  # full resolution through stage 2: one downsampling
}
MODIFIERS = {
    "highpass": "a fixed high-pass branch (Laplacian, second differences) beside RGB",
    "dct": "a fixed 8x8 block-DCT magnitude branch beside RGB",
    "stem2": "ResNet-CIFAR: a stride-2 first conv (early downsampling)",
    "hires": "ResNet-CIFAR: no downsampling before stage 3",
}


def _modified_spec(base: ModelSpec, modifiers: Sequence[str]) -> ModelSpec:
    accepts = inspect.signature(base.builder).parameters
    for m in modifiers:
        if m in DOWNSAMPLING and not set(DOWNSAMPLING[m]) <= set(accepts):
            raise UsageError(f"model modifier +{m} applies to the ResNet-CIFAR models, not {base.name}")
    if base.reparameterizable or base.gated or base.name == "pca-logreg":
        raise UsageError(f"model {base.name} takes no modifiers", "use a plain CNN, e.g. resnet20+highpass")
    fixed = {k: v for m in modifiers for k, v in DOWNSAMPLING.get(m, {}).items()}
    branches = [m for m in modifiers if m in BRANCHES]

    @functools.wraps(base.builder)  # its signature: the base's options
    def build(num_classes: int = 10, **kwargs: Any) -> nn.Module:
        clash = sorted(set(kwargs) & set(fixed))
        if clash:
            raise UsageError(f"{name} sets {', '.join(clash)} itself: drop the option or the modifier")
        model = base.builder(num_classes=num_classes, **kwargs, **fixed)
        return BranchNet(model, [BRANCHES[b]() for b in branches], num_classes) if branches else model

    name = "+".join([base.name, *modifiers])
    description = base.description + "; " + "; ".join(MODIFIERS[m] for m in modifiers)
    return ModelSpec(name, build, description, base.input_size)


def find_stage(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule `name` (e.g. "layer2") of a zoo model, looked up inside a BranchNet's body too."""
    modules = dict(model.named_modules())
    return modules.get(name, modules.get(f"body.{name}"))


def model_spec(name: str) -> ModelSpec:
    """The ModelSpec of a registered name or of `BASE+MODIFIER...` (see MODIFIERS)."""
    base, *modifiers = str(name).split("+")
    spec = MODELS[resolve_name(base)]
    if not modifiers:
        return spec
    chosen = []
    for m in modifiers:
        key = m.strip().lower()
        if key not in MODIFIERS:
            raise UsageError(f"unknown model modifier {m!r} in {name!r}", "available: " + ", ".join(MODIFIERS))
        if key in chosen:
            raise UsageError(f"model modifier +{key} is given twice in {name!r}")
        chosen.append(key)
    if {"stem2", "hires"} <= set(chosen):
        raise UsageError("+stem2 and +hires change the same downsampling: give one")
    # One name per architecture: the modifiers in MODIFIERS' order, whatever order was typed.
    return _modified_spec(spec, sorted(chosen, key=list(MODIFIERS).index))


def normalize_name(name: str) -> str:
    """Case, '-' and '_' do not matter: 'ResNet-20', 'wrn_16_2', 'RepVGG-A0' all resolve."""
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


_BY_KEY = {normalize_name(n): n for n in MODELS}


def list_models() -> list[str]:
    """Registered model names, in registry order (small to large within each family)."""
    return list(MODELS)


def resolve_name(name: str) -> str:
    """The registered name for `name` (with its +modifiers, canonical), or UsageError naming
    the closest matches."""
    if "+" in str(name):
        return model_spec(name).name
    found = _BY_KEY.get(normalize_name(name))
    if found is not None:
        return found
    close = difflib.get_close_matches(normalize_name(name), list(_BY_KEY), n=3, cutoff=0.5)
    if close:
        hint = "did you mean " + " or ".join(_BY_KEY[c] for c in close) + "?"
    else:
        hint = "available: " + ", ".join(MODELS)
    raise UsageError(f"unknown model {name!r}", hint)


def build_model(name: str, num_classes: int, **kwargs: object) -> nn.Module:
    """A freshly initialised model `name` (a registered name, or one with +modifiers) with
    `num_classes` outputs (train mode)."""
    spec = model_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UsageError(f"num_classes must be a positive integer, got {num_classes!r}")
    params = inspect.signature(spec.builder).parameters
    unknown = [k for k in kwargs if k not in params or k == "num_classes"]
    if unknown:
        accepted = [p for p in params if p != "num_classes"]
        raise UsageError(
            f"model {spec.name} takes no option {', '.join(map(repr, unknown))}",
            "accepted: " + (", ".join(accepted) if accepted else "none"),
        )
    return spec.builder(num_classes=num_classes, **kwargs)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as BN running stats are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def reparameterize(model: nn.Module) -> nn.Module:
    """Fuse re-parameterizable branches in place (RepVGG); a no-op for other models.

    Outputs are unchanged in eval mode (BN running statistics are folded in). Returns `model`.
    """
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    for block in blocks:
        block.fuse_()
    if blocks:
        for m in model.modules():
            if hasattr(m, "deploy"):
                m.deploy = True  # type: ignore[assignment]
    return model
