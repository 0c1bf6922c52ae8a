"""Dynamic students: gated ResNets (ConvNet-AIG gates that skip residual blocks per input) build,
train, sparsify under their target-rate loss, run deterministically in eval, export to ONNX, and
`fakecifar train` reports their gate pattern."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fakecifar.errors import UsageError
from fakecifar.models import MODELS, BlockGate, build_model, gate_pattern, gate_report, is_gated

GATED = ["gated-resnet20", "gated-resnet32", "gated-resnet56", "gated-resnet18"]
BLOCKS = {"gated-resnet20": [3, 3, 3], "gated-resnet32": [5, 5, 5], "gated-resnet56": [9, 9, 9]}
BLOCKS["gated-resnet18"] = [2, 2, 2, 2]
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def build(name: str, num_classes: int, **kwargs: object) -> Any:
    """build_model, typed Any: the gate API is duck-typed (no class declares it to mypy)."""
    return build_model(name, num_classes, **kwargs)


def gates_of(model: nn.Module) -> list[BlockGate]:
    return [m for m in model.modules() if isinstance(m, BlockGate)]


def varied(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random images of very different brightness, so that input-dependent gates disagree."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * torch.linspace(0.0, 4.0, n).view(-1, 1, 1, 1)


def calibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BN running statistics from `x` (one training forward), so eval outputs have a sane scale."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize("name", GATED)
def test_gated_models_build_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, 3)
    assert MODELS[name].gated and is_gated(model) and model.gate_stages == BLOCKS[name]
    assert len(gates_of(model)) == sum(BLOCKS[name])
    x = torch.rand(4, 3, 16, 16)
    out = model(x)
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    rates = model.gate_rates()
    assert len(rates) == sum(BLOCKS[name]) and all(0.0 <= r <= 1.0 for r in rates)
    (F.cross_entropy(out, torch.tensor([0, 1, 2, 0])) + model.gate_loss()).backward()
    for gate in gates_of(model):  # every gate learns, through the straight-through estimator
        assert gate.fc2.bias.grad is not None and gate.fc2.bias.grad.abs().sum() > 0
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the features -> head split that feature distillation relies on
        model.eval()
        assert torch.allclose(model.linear(model.forward_features(x)), model(x), atol=1e-5)


def test_plain_resnets_are_not_gated() -> None:
    model = build("resnet20", 10)
    assert not is_gated(model) and not MODELS["resnet20"].gated
    with pytest.raises(ValueError, match="no gates"):
        gate_report(model, torch.rand(1, 3, 8, 8))


def test_gates_start_open() -> None:
    torch.manual_seed(0)
    model = build("gated-resnet20", 10)
    x = torch.rand(64, 3, 8, 8)
    with torch.no_grad():
        model(x)
        train_rates = model.gate_rates()
        model.eval()
        model(x)
    assert model.gate_rates() == [1.0] * 9  # the argmax executes every block
    assert 0.75 < float(np.mean(train_rates)) < 0.97  # Gumbel samples: AIG's ~87% start


def test_gate_loss_is_the_target_rate_loss_and_differentiable() -> None:
    torch.manual_seed(0)
    model = build("gated-resnet20", 3, gate_target=0.3, gate_weight=1.5)
    assert float(model.gate_loss()) == 0.0  # before any forward
    model(torch.rand(8, 3, 8, 8))
    loss = model.gate_loss()
    assert loss.shape == () and loss.requires_grad
    want = 1.5 * np.mean([(r - 0.3) ** 2 for r in model.gate_rates()])
    assert abs(loss.item() - want) < 1e-6
    loss.backward()
    # lowering the execution rate toward 0.3 means raising skip and lowering execute logits
    for gate in gates_of(model):
        grad = gate.fc2.bias.grad
        assert grad is not None and grad[1] > 0 > grad[0]


def test_sgd_on_the_gate_loss_lowers_the_execution_rate() -> None:
    torch.manual_seed(0)
    model = build("gated-resnet20", 3, gate_target=0.0, gate_weight=20.0)
    x, y = torch.rand(16, 3, 8, 8), torch.arange(16) % 3
    model.eval()
    with torch.no_grad():
        model(x)
    before = float(np.mean(model.gate_rates()))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(8):
        loss = F.cross_entropy(model(x), y) + model.gate_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        model(x)
    after = float(np.mean(model.gate_rates()))
    assert before == 1.0 and after < 0.5, (before, after)


def test_eval_is_deterministic_and_training_follows_the_seed() -> None:
    torch.manual_seed(0)
    model = build("gated-resnet20", 3)
    for gate in gates_of(model)[::2]:  # make some gates depend on the input
        nn.init.normal_(gate.fc2.weight, std=3.0)
        nn.init.zeros_(gate.fc2.bias)
    x = varied(16, 8)
    calibrate_bn(model, x)
    with torch.no_grad():
        first, rates = model(x), model.gate_rates()
        torch.manual_seed(123)  # eval draws nothing: another RNG state changes nothing
        assert torch.equal(model(x), first) and model.gate_rates() == rates
        assert any(0.0 < r < 1.0 for r in rates)
        model.train()
        torch.manual_seed(5)
        a, a_rates = model(x), model.gate_rates()
        torch.manual_seed(5)
        assert torch.equal(model(x), a) and model.gate_rates() == a_rates


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    from fakecifar.checkpoint import OnnxClassifier, export_onnx

    torch.manual_seed(0)
    model = build("gated-resnet20", 3)
    gates = gates_of(model)
    with torch.no_grad():
        gates[4].fc2.bias.copy_(torch.tensor([2.0, 0.1]))  # a block always skipped
    nn.init.normal_(gates[1].fc2.weight, std=3.0)  # and one skipped for some inputs only
    nn.init.zeros_(gates[1].fc2.bias)
    x01 = (varied(12, 32) / 4).numpy()
    norm = (torch.from_numpy(x01) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    calibrate_bn(model, norm)
    model.train()
    model(norm).sum().backward()  # the model holds a graph's gates: export must still copy it
    model.eval()
    with torch.no_grad():
        want = model(norm).numpy()
    rates = model.gate_rates()
    assert rates[4] == 0.0 and 0.0 < rates[1] < 1.0, rates
    meta = {"arch": "gated-resnet20", "classes": ["a", "b", "c"], "mean": MEAN, "std": STD, "input_size": 32}
    path = export_onnx(model, meta, tmp_path / "gated.onnx")
    got = OnnxClassifier(path).predict_logits(x01, batch_size=5)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-3


def test_deepcopy_after_a_training_forward_keeps_weights_not_gates() -> None:
    model = build("gated-resnet20", 3)
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    twin = copy.deepcopy(model)  # EMA and export copy the training model
    assert twin.gate_rates() == [] and len(model.gate_rates()) == 9
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_gate_pattern_and_report() -> None:
    assert gate_pattern([1, 0.9, 0.2, 1, 0, 1]) == "xx-x-x"
    assert gate_pattern([1, 0.9, 0.2, 1, 0, 1], [3, 3]) == "xx-|x-x"
    assert gate_pattern([0.5, 0.49], [1, 1]) == "x|-"  # half the inputs counts as executed
    assert gate_pattern([]) == ""
    with pytest.raises(ValueError, match="add up"):
        gate_pattern([1, 1, 1], [2, 2])
    model = build("gated-resnet20", 3).train()
    assert gate_report(model, torch.rand(4, 3, 8, 8)) == "xxx|xxx|xxx (mean rate 1.00)"
    assert model.training  # the report leaves the mode as it was


def test_gate_options() -> None:
    model = build("gated-resnet32", 10, gate_target=0.4, gate_weight=0.5)
    assert (model.gate_target, model.gate_weight) == (0.4, 0.5)
    with pytest.raises(UsageError, match="gate_target"):
        build_model("gated-resnet20", 10, gate_target=1.5)
    with pytest.raises(UsageError, match="gate_weight"):
        build_model("gated-resnet20", 10, gate_weight=-1.0)
    # the plain architecture is untouched: same parameter count as the paper's ResNet-20
    assert MODELS["resnet20"].param_count() == 269_722 < MODELS["gated-resnet20"].param_count()


@pytest.mark.parametrize("name", ["gated-resnet20", "resnet20"])
def test_classification_step_adds_the_gate_loss(name: str) -> None:
    from fakecifar.training.classification import ClassificationTask
    from fakecifar.training.config import TrainConfig
    from fakecifar.training.task import StepContext

    torch.manual_seed(0)
    model = build(name, 3)
    task = ClassificationTask(TrainConfig(lr=0.0, weight_decay=0.0), 3)  # lr 0: the step changes no weight
    task.setup(model, torch.device("cpu"))
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 3
    torch.manual_seed(1)
    out = task.step((x, {"labels": y}), StepContext(model, model, torch.device("cpu")))
    torch.manual_seed(1)  # the same Gumbel draws again
    with torch.no_grad():
        want = F.cross_entropy(model(x), y)
        if is_gated(model):
            gate_loss = model.gate_loss()
            assert gate_loss > 0
            want = want + gate_loss
    assert abs(out.loss.item() - want.item()) < 1e-5


def test_train_cli_reports_the_gate_pattern(cli, make_shard, tmp_path) -> None:
    from fakecifar.checkpoint import OnnxClassifier, load_checkpoint

    data = make_shard("train.h5", n=24)
    val = make_shard("val.h5", n=12, seed=7)
    out = tmp_path / "g.pt"
    args = ["--batch-size", "8", "--precision", "fp32", "--epochs", "1", "--val", val, "-o", out, "--onnx"]
    result = cli("train", data, "--model", "gated-resnet20", *args)
    assert result.exit_code == 0, result.stderr
    assert result.lines == [str(out), str(tmp_path / "g.onnx")]
    found = re.search(r"^gates \(execution rate per block, x = mostly executed\): (.*)$", result.stderr, re.M)
    assert found, result.stderr
    assert re.fullmatch(r"[x-]{3}\|[x-]{3}\|[x-]{3} \(mean rate [01]\.\d\d\)", found.group(1)), found.group(1)
    model, meta = load_checkpoint(out)
    assert meta["arch"] == "gated-resnet20" and is_gated(model)
    assert OnnxClassifier(tmp_path / "g.onnx").arch == "gated-resnet20"
    plain = cli("train", data, "--model", "resnet20", *args[:-3], "-o", tmp_path / "p.pt")
    assert plain.exit_code == 0 and "gates" not in plain.stderr, plain.stderr
