"""Checkpoints: .pt round trips, safe loading, foreign .th files, ONNX export and inference."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fakecifar.checkpoint import (
    CIFAR10_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OnnxClassifier,
    export_onnx,
    load_checkpoint,
    read_onnx_meta,
    save_checkpoint,
)
from fakecifar.errors import BadCheckpointError, BadImageError, OutputError, UsageError
from fakecifar.models import build_model, reparameterize

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CLASSES = ["real", "fake", "other"]
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def calibrated(name: str, num_classes: int, seed: int = 0, **kwargs: object) -> nn.Module:
    """A random model whose BN running stats come from data, so eval outputs have a sane scale."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))
    return model.eval()


def normalized(
    x: torch.Tensor, mean: tuple[float, ...] | list[float], std: tuple[float, ...] | list[float]
) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def save(path: Path, model: nn.Module, arch: str = "resnet20", **kw: object) -> Path:
    args = {"arch": arch, "classes": CLASSES, "mean": MEAN, "std": STD, "input_size": 32}
    args.update(kw)
    return save_checkpoint(path, model, **args)  # type: ignore[arg-type]


class RunsShell:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


# ----------------------------------------------------------------------------- .pt


def test_round_trip_keeps_outputs_and_metadata(tmp_path: Path) -> None:
    model = calibrated("resnet20", 3)
    train = {"epochs": 3, "acc": np.float32(0.5), "args": {"out": tmp_path, "lr": 0.1}, "tags": {"a"}}
    path = save(tmp_path / "m.pt", model, train=train)
    assert path == tmp_path / "m.pt" and sorted(os.listdir(tmp_path)) == ["m.pt"]  # no .partial left

    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["format"] == "fakecifar-checkpoint" and meta["version"] == 1
    assert meta["arch"] == "resnet20" and meta["arch_kwargs"] == {}
    assert meta["classes"] == CLASSES and meta["mean"] == list(MEAN) and meta["std"] == list(STD)
    assert meta["input_size"] == [32, 32] and meta["path"] == str(path)
    assert meta["train"] == {"epochs": 3, "acc": 0.5, "args": {"out": str(tmp_path), "lr": 0.1}, "tags": ["a"]}


def test_save_replaces_atomically_and_reports_unwritable_dirs(tmp_path: Path) -> None:
    model = build_model("lenet5", 3)
    path = save(tmp_path / "m.pt", model, arch="lenet5")
    save(path, build_model("lenet5", 2), arch="lenet5", classes=["a", "b"])
    assert load_checkpoint(path)[1]["classes"] == ["a", "b"]
    with pytest.raises(OutputError, match="nowhere"):
        save(tmp_path / "nowhere" / "m.pt", model, arch="lenet5")
    assert not (tmp_path / "nowhere").exists()


def test_save_validates_metadata(tmp_path: Path) -> None:
    model = build_model("lenet5", 3)
    with pytest.raises(UsageError, match="std"):
        save(tmp_path / "m.pt", model, arch="lenet5", std=(0.2, 0.0, 0.2))
    with pytest.raises(UsageError, match="duplicate"):
        save(tmp_path / "m.pt", model, arch="lenet5", classes=["a", "a", "b"])
    with pytest.raises(UsageError, match="unknown model"):
        save(tmp_path / "m.pt", model, arch="lenet6")
    assert list(tmp_path.iterdir()) == []


def test_reparameterized_repvgg_reloads_fused(tmp_path: Path) -> None:
    model = reparameterize(calibrated("repvgg-a0", 3))
    path = save(tmp_path / "rep.pt", model, arch="repvgg-a0")
    loaded, meta = load_checkpoint(path)
    assert meta["arch_kwargs"] == {"deploy": True}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = RunsShell(f"touch {shlex.quote(str(marker))}")
    zipped = tmp_path / "evil.pt"
    torch.save({"state_dict": payload, "format": "fakecifar-checkpoint"}, zipped)
    legacy = tmp_path / "evil.th"  # pre-1.6 layout: a bare pickle stream
    legacy.write_bytes(pickle.dumps({"state_dict": payload}))

    for path in (zipped, legacy):
        with pytest.raises(BadCheckpointError) as info:
            load_checkpoint(path, arch="resnet20")
        assert str(path) in str(info.value)
        assert "refused" in str(info.value) and info.value.hint
        assert not marker.exists(), "the payload ran"

    pickle.loads(legacy.read_bytes())  # control: the payload is live when unpickled unsafely
    assert marker.exists()


def test_damaged_and_wrong_files_are_refused(tmp_path: Path) -> None:
    good = save(tmp_path / "m.pt", build_model("lenet5", 3), arch="lenet5")
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello world, not a checkpoint")
    for path in (truncated, junk, tmp_path / "missing.pt"):
        with pytest.raises(BadCheckpointError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
    with pytest.raises(BadCheckpointError, match="ONNX"):
        load_checkpoint(tmp_path / "model.onnx")


def test_newer_version_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path / "m.pt", build_model("lenet5", 3), arch="lenet5")
    blob = torch.load(path, weights_only=True)
    blob["version"] = 99
    torch.save(blob, path)
    with pytest.raises(BadCheckpointError, match="version 99"):
        load_checkpoint(path)


def test_arch_mismatch_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path / "m.pt", build_model("resnet20", 3))
    with pytest.raises(BadCheckpointError) as info:
        load_checkpoint(path, arch="resnet56")
    assert "resnet20" in str(info.value) and "resnet56" in str(info.value)
    assert load_checkpoint(path, arch="ResNet-20")[1]["arch"] == "resnet20"
    with pytest.raises(UsageError, match="resnet99"):
        load_checkpoint(path, arch="resnet99")


# ----------------------------------------------------------------------------- foreign files


def foreign_th(path: Path, model: nn.Module) -> Path:
    """A file laid out like the ResNet-CIFAR .th releases (DataParallel keys, no BN counters)."""
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state, "best_prec1": 91.5}, path)
    return path


def test_foreign_th_loads_with_arch(tmp_path: Path) -> None:
    model = calibrated("resnet20", 10)
    path = foreign_th(tmp_path / "r20.th", model)
    loaded, meta = load_checkpoint(path, arch="resnet20")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["classes"] == list(CIFAR10_CLASSES)
    assert meta["mean"] == list(IMAGENET_MEAN) and meta["std"] == list(IMAGENET_STD)
    assert meta["input_size"] == [32, 32] and meta["train"] == {"best_prec1": 91.5}


def test_foreign_th_head_size_comes_from_the_weights(tmp_path: Path) -> None:
    path = foreign_th(tmp_path / "r20c100.th", build_model("resnet20", 100))
    loaded, meta = load_checkpoint(path, arch="resnet20")
    head = loaded.linear
    assert isinstance(head, nn.Linear)
    assert len(meta["classes"]) == 100 and head.out_features == 100


def test_foreign_th_needs_and_checks_arch(tmp_path: Path) -> None:
    path = foreign_th(tmp_path / "r20.th", build_model("resnet20", 10))
    with pytest.raises(BadCheckpointError) as info:
        load_checkpoint(path)
    assert "--arch resnet20" in str(info.value)  # the hint guesses the architecture
    with pytest.raises(BadCheckpointError) as info:
        load_checkpoint(path, arch="resnet32")
    message = str(info.value)
    assert str(path) in message and "missing" in message and "layer1.3.conv1.weight" in message
    assert "fit --arch resnet20" in message


def test_unknown_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.th"
    torch.save({"foo": 1, "bar": [1, 2], "weights_list": [torch.zeros(2)]}, path)
    with pytest.raises(BadCheckpointError) as info:
        load_checkpoint(path, arch="resnet20")
    assert "unknown checkpoint layout" in str(info.value) and "'foo'" in str(info.value)
    torch.save([torch.zeros(3)], path)
    with pytest.raises(BadCheckpointError, match="unknown checkpoint layout"):
        load_checkpoint(path, arch="resnet20")


# ----------------------------------------------------------------------------- real files

requires_shared_models = pytest.mark.skipif(
    not (SHARED / "models" / "resnet20-12fca82f.th").is_file(),
    reason=f"pretrained ResNet-CIFAR files not found in {SHARED / 'models'} (only in the dev workspace)",
)


@pytest.fixture(scope="module")
def cifar_sample() -> tuple[torch.Tensor, torch.Tensor]:
    """Five real CIFAR-10 training images per class, as float [N,3,32,32] in [0,1], and labels."""
    archive = SHARED / "data" / "cifar10-train-jpg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not found (only in the dev workspace)")
    from PIL import Image

    per_class: dict[str, int] = {}
    images, labels = [], []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or per_class.get(parts[1], 0) >= 5:
                continue
            per_class[parts[1]] = per_class.get(parts[1], 0) + 1
            fh = tar.extractfile(member)
            assert fh is not None
            images.append(np.asarray(Image.open(fh).convert("RGB")))
            labels.append(CIFAR10_CLASSES.index(parts[1]))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor(labels)


@requires_shared_models
@pytest.mark.parametrize("arch, filename", [("resnet20", "resnet20-12fca82f.th"), ("resnet56", "resnet56-4bfd9763.th")])
def test_pretrained_resnet_cifar_loads_and_classifies(arch: str, filename: str, cifar_sample) -> None:
    model, meta = load_checkpoint(SHARED / "models" / filename, arch=arch)
    x, y = cifar_sample
    with torch.no_grad():
        logits = model(normalized(x, meta["mean"], meta["std"]))
    assert torch.isfinite(logits).all()
    # ~86% / 94% on this sample; a wrong shortcut padding or normalization gives ~10-30%.
    assert (logits.argmax(1) == y).float().mean().item() >= 0.7


@requires_shared_models
def test_pretrained_file_refused_as_the_wrong_depth() -> None:
    with pytest.raises(BadCheckpointError, match="fit --arch resnet56"):
        load_checkpoint(SHARED / "models" / "resnet56-4bfd9763.th", arch="resnet20")


# ----------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, dict, Path]:
    model = calibrated("resnet20", 3, seed=1)
    meta = {
        "arch": "resnet20",
        "classes": CLASSES,
        "mean": MEAN,
        "std": STD,
        "input_size": 32,
        "train": {"val_acc": 0.75},
    }
    path = export_onnx(model, meta, tmp_path_factory.mktemp("onnx") / "m.onnx")
    return model, meta, path


def test_onnx_agrees_with_torch(exported: tuple[nn.Module, dict, Path]) -> None:
    model, meta, path = exported
    assert sorted(os.listdir(path.parent)) == ["m.onnx"]
    clf = OnnxClassifier(path)
    rng = np.random.default_rng(0)
    for n in (1, 7):  # dynamic batch axis
        x = rng.random((n, 3, 32, 32), dtype=np.float32)
        got = clf.predict_logits(x, batch_size=3)
        with torch.no_grad():
            want = model(normalized(torch.from_numpy(x), MEAN, STD)).numpy()
        assert got.shape == (n, 3) and got.dtype == np.float32
        assert np.abs(got - want).max() < 1e-3
        assert (got.argmax(1) == want.argmax(1)).all()
    probs = clf.predict_proba(x)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_few_images_run_unoptimized_and_many_reopen_optimized_with_the_same_answers(
    exported: tuple[nn.Module, dict, Path],
) -> None:
    # A one-image detect should not pay for graph optimization; a big batch should get it.
    model, _, path = exported
    clf = OnnxClassifier(path)
    x = np.random.default_rng(2).random((40, 3, 32, 32), dtype=np.float32)
    few = clf.predict_logits(x[:4])
    light_session = clf.session
    many = clf.predict_logits(x)
    optimized_session = clf.session
    assert optimized_session is not light_session  # reopened, optimized ...
    again = clf.predict_logits(x[:4])
    assert clf.session is optimized_session  # ... once, and kept for later calls
    assert np.allclose(again, many[:4], atol=1e-5)
    with torch.no_grad():
        want = model(normalized(torch.from_numpy(x), MEAN, STD)).numpy()
    assert np.abs(few - want[:4]).max() < 1e-3 and np.abs(many - want).max() < 1e-3


def test_onnx_meta_round_trip(exported: tuple[nn.Module, dict, Path]) -> None:
    _, _, path = exported
    meta = read_onnx_meta(path)
    assert meta["arch"] == "resnet20" and meta["classes"] == CLASSES
    assert meta["mean"] == list(MEAN) and meta["std"] == list(STD) and meta["input_size"] == [32, 32]
    assert meta["train"] == {"val_acc": 0.75}
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["classes"]) == CLASSES  # JSON strings, readable by any ONNX tool
    clf = OnnxClassifier(path)
    assert clf.classes == CLASSES and clf.input_size == (32, 32) and clf.arch == "resnet20"


def test_onnx_non_square_and_fused_repvgg(tmp_path: Path) -> None:
    model = calibrated("repvgg-a0", 2)
    meta = {"arch": "repvgg-a0", "classes": ["a", "b"], "mean": MEAN, "std": STD, "input_size": (32, 40)}
    path = export_onnx(model, meta, tmp_path / "rep.onnx")
    clf = OnnxClassifier(path)
    assert clf.input_size == (32, 40) and clf.meta["arch_kwargs"] == {"deploy": True}
    x = np.random.default_rng(1).random((3, 3, 32, 40), dtype=np.float32)
    with torch.no_grad():
        want = model(normalized(torch.from_numpy(x), MEAN, STD)).numpy()
    got = clf.predict_logits(x)
    assert np.abs(got - want).max() < 1e-3 * max(1.0, float(np.abs(want).max()))
    assert (got.argmax(1) == want.argmax(1)).all()
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # fused a copy, not the caller's model


def test_onnx_classifier_checks_its_input(exported: tuple[nn.Module, dict, Path]) -> None:
    clf = OnnxClassifier(exported[2])
    with pytest.raises(BadImageError, match="32x32"):
        clf.predict_logits(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(BadImageError, match=r"\[N, 3, H, W\]"):
        clf.predict_logits(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(BadImageError, match="uint8"):
        clf.predict_logits(np.zeros((1, 3, 32, 32), np.uint8))
    assert clf.predict_logits(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, 3)


def test_foreign_or_broken_onnx_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["logits"])],
        "plain",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
    )
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), str(plain))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage" * 10)
    for path in (plain, broken):
        for opener in (read_onnx_meta, OnnxClassifier):
            with pytest.raises(BadCheckpointError) as info:
                opener(path)
            assert str(path) in str(info.value)


def test_onnx_path_does_not_import_torch(exported: tuple[nn.Module, dict, Path]) -> None:
    code = (
        "import sys, numpy as np\n"
        "import fakecifar.checkpoint as ck\n"
        "assert 'torch' not in sys.modules, 'import pulled in torch'\n"
        f"clf = ck.OnnxClassifier({str(exported[2])!r})\n"
        "out = clf.predict_logits(np.random.rand(2, 3, 32, 32).astype(np.float32))\n"
        "assert out.shape == (2, 3)\n"
        f"assert ck.read_onnx_meta({str(exported[2])!r})['arch'] == 'resnet20'\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- writes that fail


def _keeps(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    assert not list(path.parent.glob("*.partial"))


def test_save_on_a_full_disk_is_no_space_error_and_keeps_the_previous_file(full_disk_dir: Path, fill_disk) -> None:
    """torch.save meets ENOSPC as RuntimeError('... unexpected pos ...'); it becomes NoSpaceError."""
    from fakecifar.errors import NoSpaceError

    path = save(full_disk_dir / "m.pt", build_model("lenet5", 3), arch="lenet5")
    before = path.read_bytes()
    big = build_model("resnet20", 3)  # 1 MB of weights: with the first file, more than 2 MiB
    with pytest.raises(NoSpaceError) as info:
        save(path, big, extra={"pad": torch.zeros(300_000)})
    assert str(info.value) == f"no space left on device writing {path} (free space or choose another -o)"
    _keeps(path, before)
    model, meta = load_checkpoint(path)
    fill_disk(full_disk_dir, leave=64 * 1024)  # lenet5's ONNX is ~250 KB
    with pytest.raises(NoSpaceError, match="m.onnx"):
        export_onnx(model, meta, full_disk_dir / "m.onnx")
    assert not (full_disk_dir / "m.onnx").exists() and not list(full_disk_dir.glob("*.partial"))


def test_torch_write_failures_are_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a mount: torch's RuntimeError on a full disk (seen by the free space), on another
    write failure (a runtime error naming the file, not an internal error), and a RuntimeError
    that is not about writing (a bug: raised unchanged)."""
    from fakecifar.errors import FakecifarError, NoSpaceError

    path = save(tmp_path / "m.pt", build_model("lenet5", 3), arch="lenet5")
    before = path.read_bytes()

    def failing(message: str):
        def fake_save(obj, fh, *args, **kwargs):
            fh.write(b"PK\3\4 half a zip")
            raise RuntimeError(message)

        return fake_save

    class Statvfs:
        def __init__(self, free_blocks: int):
            self.f_bavail, self.f_frsize = free_blocks, 4096

    monkeypatch.setattr(torch, "save", failing("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"))
    monkeypatch.setattr(os, "statvfs", lambda p: Statvfs(0))
    with pytest.raises(NoSpaceError, match="no space left on device writing"):
        save(path, build_model("lenet5", 3), arch="lenet5")
    _keeps(path, before)
    monkeypatch.setattr(os, "statvfs", lambda p: Statvfs(10**6))
    monkeypatch.setattr(torch, "save", failing("PytorchStreamWriter failed writing file data/0: file write failed"))
    with pytest.raises(FakecifarError) as info:
        save(path, build_model("lenet5", 3), arch="lenet5")
    assert type(info.value) is FakecifarError and info.value.exit_code == 1 and str(path) in str(info.value)
    _keeps(path, before)
    monkeypatch.setattr(torch, "save", failing("something else broke"))
    with pytest.raises(RuntimeError, match="something else broke"):
        save(path, build_model("lenet5", 3), arch="lenet5")
    _keeps(path, before)


def test_injected_enospc_and_eacces_on_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from fakecifar.errors import NoSpaceError

    path = save(tmp_path / "m.pt", build_model("lenet5", 3), arch="lenet5")
    before = path.read_bytes()
    for code, kind in ((errno.ENOSPC, NoSpaceError), (errno.EDQUOT, NoSpaceError), (errno.EACCES, OutputError)):

        def fake_fsync(fd: int, code: int = code) -> None:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", fake_fsync)
        with pytest.raises(kind, match=str(path)):
            save(path, build_model("lenet5", 3), arch="lenet5")
        _keeps(path, before)


def test_a_signal_inside_torch_save_is_raised_as_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save wraps what its file raised in RuntimeError; SIGTERM (Terminated) must stay
    Terminated (exit 143), not become a write error, and the partial goes."""
    from fakecifar.errors import Terminated

    path = save(tmp_path / "m.pt", build_model("lenet5", 3), arch="lenet5")
    before = path.read_bytes()
    real_open = open

    class Interrupted:
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            raise Terminated()

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    import fakecifar.outputs as writes

    monkeypatch.setattr(
        writes, "open", lambda f, mode="r", *a, **k: Interrupted(real_open(f, mode, *a, **k)), raising=False
    )
    with pytest.raises(Terminated):
        save(path, build_model("lenet5", 3), arch="lenet5")
    _keeps(path, before)
