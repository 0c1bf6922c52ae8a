"""`fakecifar eval`: metrics, the models x datasets table, ONNX without torch, foreign .th files,
class mismatches, PGD robustness, and refusal of unsafe or unknown checkpoints."""

from __future__ import annotations

import functools
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from helpers import CLASSES3, SHARED_DATA, SHARED_MODELS, cli_in_fresh_process, needs_shared_data
from helpers import one_error_line as _one_error_line

one_error_line = functools.partial(_one_error_line, command="eval")

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet20 trained 3 epochs on 8x8 3-class images, as .pt and .onnx, plus two datasets."""
    from fakecifar.checkpoint import export_onnx, load_checkpoint
    from fakecifar.manifest import describe_directory
    from fakecifar.shards import ShardWriter, open_shards
    from fakecifar.train import make_config, train

    from helpers import random_images

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    paths = {}
    for name, n, seed in (("a", 30, 0), ("b", 18, 1)):
        images = random_images(n, (8, 8), seed)
        labels = np.arange(n) % 3
        images[labels == 0, :, :, 0] = 255  # learnable: class 0 is red-ish
        (root / name).mkdir()
        with ShardWriter(root / name / "s.h5", classes=CLASSES3, image_size=(8, 8), producer="test") as w:
            w.add_batch(images, labels, origin=(np.arange(n) % 2).astype(np.uint8))
        describe_directory(root / name)
        paths[name] = root / name
    pt = root / "m.pt"
    train(open_shards([paths["a"]]), pt, make_config(model="resnet20", epochs=3, batch_size=10, precision="fp32"))
    model, meta = load_checkpoint(pt)
    onnx = export_onnx(model, meta, root / "m.onnx")
    return {"pt": pt, "onnx": onnx, "a": paths["a"], "b": paths["b"], "root": root}


def reference_logits(pt, data_dir):
    from fakecifar.checkpoint import load_checkpoint
    from fakecifar.shards import open_shards

    model, meta = load_checkpoint(pt)
    data = open_shards([data_dir])
    x = torch.from_numpy(data.read("images")).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).numpy(), data.read("labels").astype(np.int64)


def test_single_model_report_matches_a_manual_computation(cli, trained):
    result = cli("eval", trained["pt"], "--on", trained["a"])
    assert result.exit_code == 0, result.stderr
    logits, labels = reference_logits(trained["pt"], trained["a"])
    top1 = (logits.argmax(1) == labels).mean()
    assert f"top-1 {100 * top1:.2f}%" in result.stdout
    assert "top-5 -" in result.stdout  # 3 classes: top-5 is meaningless
    for name in CLASSES3 + ["macro avg"]:
        assert any(line.startswith(name) for line in result.lines), name
    js = cli("eval", trained["pt"], "--on", trained["a"], "--json").json_lines()[0]
    assert abs(js["top1"] - top1) < 1e-9 and js["images"] == 30 and js["runtime"] == "torch"
    pred = logits.argmax(1)
    for i, c in enumerate(CLASSES3):
        tp = ((pred == i) & (labels == i)).sum()
        p = tp / max((pred == i).sum(), 1)
        r = tp / (labels == i).sum()
        f2 = 5 * p * r / (4 * p + r) if p + r else 0
        assert abs(js["per_class"][c]["precision"] - p) < 1e-9 and abs(js["per_class"][c]["recall"] - r) < 1e-9
        assert abs(js["per_class"][c]["f2"] - f2) < 1e-9
    assert np.array(js["confusion"]).sum() == 30


def test_cross_table_of_models_and_datasets(cli, trained):
    result = cli("eval", trained["pt"], trained["onnx"], "--on", trained["a"], trained["b"])
    assert result.exit_code == 0, result.stderr
    header = result.lines[0]
    assert str(trained["a"]) in header and str(trained["b"]) in header
    rows = result.lines[2:]
    assert rows[0].startswith(str(trained["pt"])) and rows[1].startswith(str(trained["onnx"]))
    pt_cells, onnx_cells = rows[0].split()[1:], rows[1].split()[1:]
    assert pt_cells == onnx_cells  # same predictions on both runtimes
    js = cli("eval", trained["pt"], trained["onnx"], "--on", trained["a"], "--on", trained["b"], "--json").json_lines()
    assert [(j["runtime"], j["dataset"]) for j in js] == [
        ("torch", str(trained["a"])),
        ("torch", str(trained["b"])),
        ("onnxruntime", str(trained["a"])),
        ("onnxruntime", str(trained["b"])),
    ]


def test_onnx_eval_runs_without_torch_and_agrees(trained):
    run = cli_in_fresh_process("eval", trained["onnx"], "--on", trained["b"], "--json")
    assert run.exit_code == 0 and "torch" not in run.imported, run.stderr
    onnx_result = run.json_lines()[0]
    logits, labels = reference_logits(trained["pt"], trained["b"])
    assert abs(onnx_result["top1"] - (logits.argmax(1) == labels).mean()) < 1e-9


def test_confusion_on_onnx_runs_without_torch(trained, tmp_path):
    run = cli_in_fresh_process("confusion", trained["onnx"], "--on", trained["b"], "--png", tmp_path / "c.png")
    assert run.exit_code == 0 and "torch" not in run.imported, run.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_foreign_th_needs_arch(cli, trained, tmp_path):
    from fakecifar.checkpoint import load_checkpoint
    from fakecifar.models import build_model

    model, _ = load_checkpoint(trained["pt"])
    th = tmp_path / "foreign.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "best_prec1": 50.0}, th)
    missing = cli("eval", th, "--on", trained["a"])
    assert missing.exit_code == 2
    one_error_line(missing, "foreign.th", "--arch")
    r = cli("eval", th, trained["pt"], "--arch", "resnet20", "--on", trained["a"], "--map-classes", "--json")
    # a foreign 3-class file gets placeholder class names: --map-classes cannot match them
    assert r.exit_code == 2 and "class0" in r.stderr
    # a foreign 10-class file gets the CIFAR-10 names: a cat/dog/frog dataset maps into them
    ten = tmp_path / "ten.th"
    torch.save({"state_dict": build_model("resnet20", 10).state_dict()}, ten)
    r = cli("eval", ten, trained["pt"], "--arch", "resnet20", "--on", trained["a"], "--map-classes", "--json")
    assert r.exit_code == 0, r.stderr
    foreign, ours = r.json_lines()
    assert foreign["images"] == ours["images"] == 30 and foreign["arch"] == "resnet20"
    assert set(foreign["per_class"]) >= set(CLASSES3) and len(foreign["per_class"]) == 10
    torch.save({"state_dict": build_model("resnet32", 10).state_dict()}, tmp_path / "deeper.th")
    auto = cli("eval", ten, tmp_path / "deeper.th", "--arch", "auto", "--on", trained["a"], "--map-classes", "--json")
    assert auto.exit_code == 0, auto.stderr
    assert [j["arch"] for j in auto.json_lines()] == ["resnet20", "resnet32"]


def test_unknown_layout_and_code_pickles_are_refused(cli, trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "odd.th"
    torch.save({"epoch": 3, "notes": "no weights here"}, odd)
    r = cli("eval", odd, "--arch", "resnet20", "--on", trained["a"])
    assert r.exit_code == 2
    one_error_line(r, "odd.th", "unknown checkpoint layout")

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    evil = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    torch.save({"state_dict": Payload()}, buffer)
    evil.write_bytes(buffer.getvalue())
    r = cli("eval", evil, "--arch", "resnet20", "--on", trained["a"])
    assert r.exit_code == 2
    one_error_line(r, "evil.pt", "refused")
    assert not (tmp_path / "pwned").exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload()))
    r = cli("confusion", raw, "--on", trained["a"])
    assert r.exit_code == 2 and "raw.pt" in r.stderr
    assert not (tmp_path / "pwned").exists()


def test_class_mismatch_is_explained_or_mapped(cli, trained, make_shard, tmp_path):
    from fakecifar.shards import open_shards

    from helpers import random_images

    src = open_shards([trained["a"]])
    images, labels = src.read("images"), src.read("labels")
    order = ["dog", "cat", "frog"]  # same names, another order
    perm = np.array([order.index(c) for c in CLASSES3])
    other = make_shard("reordered.h5", images=images, labels=perm[labels], classes=order)
    r = cli("eval", trained["pt"], "--on", other)
    assert r.exit_code == 2
    one_error_line(
        r,
        "m.pt",
        "reordered.h5",
        "['cat', 'dog', 'frog'] (3 classes)",
        "['dog', 'cat', 'frog'] (3 classes)",
        "--map-classes",
    )
    mapped = cli("eval", trained["pt"], "--on", other, "--map-classes", "--json").json_lines()[0]
    plain = cli("eval", trained["pt"], "--on", trained["a"], "--json").json_lines()[0]
    assert mapped["top1"] == plain["top1"]
    # a dataset with a class the model lacks: those images are skipped, with a warning
    extra = make_shard("extra.h5", n=8, images=random_images(8), labels=np.arange(8) % 4, classes=CLASSES3 + ["owl"])
    r = cli("eval", trained["pt"], "--on", extra, "--map-classes")
    assert r.exit_code == 0, r.stderr
    assert "2 image(s)" in r.stderr and "6 images" in r.stdout


def test_pgd_l2_robust_accuracy(cli, trained):
    r = cli(
        "eval", trained["pt"], "--on", trained["b"], "--attack", "pgd-l2", "--eps", "0,0.5,8", "--steps", "5", "--json"
    )
    assert r.exit_code == 0, r.stderr
    js = r.json_lines()[0]
    robust = js["robust"]
    assert set(robust) == {"0.0", "0.5", "8.0"} and robust["0.0"] == js["top1"]
    assert robust["8.0"] <= robust["0.5"] <= js["top1"]
    assert robust["8.0"] < js["top1"] or js["top1"] == 0
    table = cli("eval", trained["pt"], "--on", trained["b"], "--attack", "pgd-l2", "--eps", "0.5", "--steps", "2")
    assert "robust top-1" in table.stdout
    onnx = cli("eval", trained["onnx"], "--on", trained["b"], "--attack", "pgd-l2")
    assert onnx.exit_code == 2
    one_error_line(onnx, "m.onnx", "gradients")
    bad = cli("eval", trained["pt"], "--on", trained["b"], "--attack", "pgd-l2", "--eps", "0,-1")
    assert bad.exit_code == 2


def test_pgd_stays_in_the_ball_and_the_box():
    from fakecifar.attacks import pgd_l2
    from fakecifar.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet5", 10).eval()
    x = torch.rand(4, 3, 32, 32)
    y = torch.arange(4)
    adv = pgd_l2(model, x, y, eps=0.5, steps=10)
    assert (adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert adv.min() >= 0 and adv.max() <= 1
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(adv), y) > loss(model(x), y)


def test_bad_usage(cli, trained, tmp_path):
    assert cli("eval", trained["pt"]).exit_code == 2  # no dataset
    r = cli("eval", "--on", trained["a"])  # no model
    assert r.exit_code == 2 and "no input models" in r.stderr
    r = cli("eval", tmp_path / "nope.pt", "--on", trained["a"])
    assert r.exit_code == 2 and "nope.pt" in r.stderr
    r = cli("eval", trained["pt"], "--on", trained["a"], "--target", "origin")
    assert r.exit_code == 2 and "['real', 'fake'] (2 classes)" in r.stderr


def test_models_from_stdin(cli, trained):
    r = cli("eval", "--on", trained["a"], stdin=f"{trained['pt']}\n{trained['onnx']}\n")
    assert r.exit_code == 0, r.stderr
    assert r.lines[2].startswith(str(trained["pt"])) and r.lines[3].startswith(str(trained["onnx"]))


def test_tta_averages_the_mirror(cli, trained):
    plain = cli("eval", trained["onnx"], "--on", trained["a"], "--json").json_lines()[0]
    tta = cli("eval", trained["onnx"], "--on", trained["a"], "--json", "--tta").json_lines()[0]
    tta_pt = cli("eval", trained["pt"], "--on", trained["a"], "--json", "--tta").json_lines()[0]
    assert tta["tta"] and not plain["tta"]
    assert tta["top1"] == tta_pt["top1"]


@needs_shared_data
def test_pretrained_resnet20_on_real_cifar10_jpegs(cli, tmp_path):
    """The pretrained ResNet-20 .th (91.78% on the PNG test set) on 300 JPEG training images."""
    th = SHARED_MODELS / "resnet20-12fca82f.th"
    per_class: dict[str, int] = {}
    with tarfile.open(SHARED_DATA / "cifar10-train-jpg.tar.gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and per_class.get(parts[1], 0) < 30:
                per_class[parts[1]] = per_class.get(parts[1], 0) + 1
                (tmp_path / "src" / parts[1]).mkdir(parents=True, exist_ok=True)
                extracted = tar.extractfile(member)
                assert extracted is not None
                (tmp_path / "src" / parts[1] / parts[2]).write_bytes(extracted.read())
            if len(per_class) == 10 and min(per_class.values()) >= 30:
                break
    assert cli("import", tmp_path / "src", "-o", tmp_path / "shards").exit_code == 0
    r = cli("eval", th, "--arch", "resnet20", "--on", tmp_path / "shards", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json_lines()[0]["top1"] >= 0.85  # training images it has seen; JPEG costs a little
