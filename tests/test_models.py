"""The model zoo: every model builds and runs; counts, names and RepVGG fusion are right."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

from fakecifar.errors import UsageError
from fakecifar.models import MODELS, ModelSpec, build_model, count_params, list_models, reparameterize

REQUIRED = [
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg8",
    "vgg11",
    "vgg16",
    "repvgg-a0",
    "repvgg-a2",
    "mobilenetv2",
    "resnet18",
    "wrn-16-1",
    "wrn-16-2",
    "wrn-40-2",
    "lenet5",
]


def calibrate_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BN layers running statistics from data, so eval-mode outputs have a sane scale."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0  # running stats = this batch's stats
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def test_registry_has_the_zoo() -> None:
    assert set(REQUIRED) <= set(list_models())
    for name, spec in MODELS.items():
        assert isinstance(spec, ModelSpec) and spec.name == name
        assert spec.description and "\n" not in spec.description
        assert spec.input_size >= 32


@pytest.mark.parametrize("num_classes", [10, 2])
@pytest.mark.parametrize("name", REQUIRED)
def test_every_model_forwards(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        if num_classes == 2:  # once per model is enough
            head, features = model.linear, model.forward_features  # every model has both
            assert callable(head) and callable(features)
            assert torch.allclose(head(features(x)), out, atol=1e-5)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet20", "vgg8", "wrn-16-1", "mobilenetv2", "lenet5", "repvgg-a0", "resnet18"])
def test_larger_and_non_square_inputs(name: str) -> None:
    model = build_model(name, 3).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 48, 40)).shape == (1, 3)


def test_param_counts_match_the_papers() -> None:
    assert count_params(build_model("resnet20", 10)) == 269_722  # 0.27M, no shortcut params
    assert count_params(build_model("resnet56", 10)) == 853_018  # 0.85M
    assert MODELS["resnet20"].param_count() == 269_722
    assert MODELS["resnet20"].param_count(num_classes=100) == 269_722 + 90 * 65


def test_descriptions_state_the_right_size() -> None:
    for name, spec in MODELS.items():
        found = re.search(r"\(([\d.]+)([KM])", spec.description)
        assert found, f"{name}: description gives no size"
        stated = float(found.group(1)) * (1e3 if found.group(2) == "K" else 1e6)
        actual = spec.param_count()
        assert abs(stated - actual) / actual < 0.05, (name, stated, actual)


def test_count_params_trainable_only() -> None:
    model = build_model("lenet5", 10)
    total = count_params(model)
    conv1 = model.conv1
    assert isinstance(conv1, nn.Conv2d)
    conv1.weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == total - conv1.weight.numel()


@pytest.mark.parametrize("alias", ["ResNet-20", "resnet_20", "RESNET20"])
def test_names_are_forgiving(alias: str) -> None:
    assert count_params(build_model(alias, 10)) == 269_722


def test_unknown_model_names_the_closest() -> None:
    with pytest.raises(UsageError) as info:
        build_model("resnt20", 10)
    assert "resnt20" in str(info.value) and "resnet20" in str(info.value)
    with pytest.raises(UsageError) as info:
        build_model("transformer", 10)
    assert "transformer" in str(info.value)
    assert all(n in str(info.value) for n in ("lenet5", "repvgg-a0"))


def test_bad_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="num_classes"):
        build_model("resnet20", 0)
    with pytest.raises(UsageError, match="width") as info:
        build_model("resnet20", 10, width=2)
    assert "stem_stride, stage_strides" in str(info.value)  # what +stem2 / +hires set
    with pytest.raises(UsageError, match="none"):
        build_model("vgg8", 10, width=2)
    with pytest.raises(UsageError, match="deploy"):
        build_model("wrn-16-1", 10, deploy=True)
    assert build_model("wrn-16-1", 10, dropout=0.3) is not None
    assert build_model("mobilenetv2", 10, width_mult=0.5) is not None


@pytest.mark.parametrize("name", ["repvgg-a0", "repvgg-a2"])
def test_repvgg_reparameterization_keeps_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = calibrate_bn(build_model(name, 10))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        reparameterize(model)
        after = model(x)
    assert model.deploy is True
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert (after - before).abs().max().item() < 1e-4
    # the fused layout is what deploy=True builds, so a fused checkpoint can be reloaded
    with torch.device("meta"):  # shapes only
        fused = build_model(name, 10, deploy=True)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fused.state_dict().items()}
    assert count_params(model) < MODELS[name].param_count()


def test_reparameterize_is_a_no_op_elsewhere() -> None:
    model = build_model("resnet20", 10).eval()
    keys = list(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        assert reparameterize(model) is model
        assert torch.equal(model(x), before)
    assert list(model.state_dict()) == keys
    assert not hasattr(model, "deploy")


@pytest.mark.parametrize("name", ["resnet20+highpass", "resnet20+dct", "resnet20+stem2", "resnet20+hires",
                                  "wrn-16-1+dct+highpass", "ResNet-20+HighPass"])  # fmt: skip
def test_modified_models_forward_and_keep_the_base_options(name: str) -> None:
    from fakecifar.models import resolve_name

    model: Any = calibrate_bn(build_model(name, num_classes=2))
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 2)
    assert model.forward_features(torch.rand(3, 3, 32, 32)).shape == (3, model.num_features)
    assert resolve_name(name) == resolve_name(resolve_name(name))  # canonical, stable
    # The name alone rebuilds the same architecture (checkpoints store only it).
    assert build_model(resolve_name(name), 2).state_dict().keys() == model.state_dict().keys()


def test_branches_see_fixed_high_frequency_filters() -> None:
    from fakecifar.models import DCTBranch, HighPassBranch

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    dct: Any = DCTBranch()
    coefficients = torch.nn.functional.conv2d(x, dct.filters, stride=8, groups=3)
    assert coefficients.shape == (2, 192, 2, 2)
    assert torch.allclose(coefficients.pow(2).sum(), x.pow(2).sum(), rtol=1e-4)  # orthonormal: Parseval
    hp: Any = HighPassBranch()
    flat = torch.nn.functional.conv2d(torch.full((1, 3, 8, 8), 0.7), hp.kernels, padding=1, groups=3)
    assert flat[..., 1:-1, 1:-1].abs().max() < 1e-6  # a constant image has no high frequencies
    assert not [k for k in build_model("resnet20+dct+highpass", 2).state_dict() if "filters" in k or "kernels" in k]


def test_downsampling_modifiers_change_the_resolution() -> None:
    sizes = {}
    for name in ("resnet20", "resnet20+stem2", "resnet20+hires"):
        model: Any = build_model(name, 2).eval()
        seen: list[int] = []
        model.layer2.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.shape[-1]))
        with torch.no_grad():
            model(torch.rand(1, 3, 32, 32))
        sizes[name] = seen[0]
    assert sizes == {"resnet20": 16, "resnet20+stem2": 8, "resnet20+hires": 32}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("resnet20+sharpen", "unknown model modifier 'sharpen'"),
        ("vgg8+stem2", "applies to the ResNet-CIFAR models"),
        ("resnet20+dct+dct", "given twice"),
        ("resnet20+stem2+hires", "give one"),
        ("repvgg-a0+dct", "takes no modifiers"),
        ("resnet21+dct", "unknown model 'resnet21'"),
    ],
)
def test_bad_modifiers_are_usage_errors(name: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        build_model(name, 2)


def test_modifier_order_does_not_matter_and_clashes_are_refused() -> None:
    from fakecifar.models import find_stage, resolve_name

    assert resolve_name("resnet20+dct+highpass") == resolve_name("resnet20+HighPass+dct") == "resnet20+highpass+dct"
    with pytest.raises(UsageError, match="sets stem_stride itself"):
        build_model("resnet20+stem2", 2, stem_stride=1)
    with pytest.raises(UsageError, match="three stage_strides"):
        build_model("resnet20", 2, stage_strides=(1, 2))
    # the stages distillation hooks (ZSKT's attention) are found inside a branch network's body
    assert find_stage(build_model("resnet20+dct", 2), "layer2") is not None
    assert find_stage(build_model("resnet20", 2), "layer2") is not None
