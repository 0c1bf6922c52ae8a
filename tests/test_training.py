"""The training engine's pieces (fakecifar.training) on their own: a custom task with two
optimizers alternating, batch sources that are not shards, callbacks receiving records, exact
resume through the engine, the hooks a distillation task needs, the settings registry a second
command reuses, and `train()` against a plain hand-written loop, bit for bit."""

from __future__ import annotations

import copy
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers import CLASSES3

torch = pytest.importorskip("torch")
F = torch.nn.functional

from fakecifar.training.callbacks import Callback, EarlyStopping, EpochSnapshots, SaveBest  # noqa: E402
from fakecifar.training.loop import Engine  # noqa: E402
from fakecifar.training.sources import GeneratedBatches  # noqa: E402
from fakecifar.training.stopping import TrainingDiverged, TrainingInterrupted  # noqa: E402
from fakecifar.training.task import StepContext, StepOutput, Task  # noqa: E402


def random_batch(epoch: int, step: int) -> tuple[Any, Any]:
    """8 random 4-d points and their labels: a pure function of (epoch, step)."""
    gen = torch.Generator().manual_seed(1000 * epoch + step)
    return torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)


class Alternating(Task):
    """A toy of the generator-based task to come: two optimizers (one per layer) that take
    turns, one update per step, plus a state of its own (how many updates each made)."""

    def setup(self, model, device):
        self.first = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
        self.second = torch.optim.SGD(model[2].parameters(), lr=0.01, momentum=0.9)
        self.updates = [0, 0]

    def optimizers(self):
        return [self.first, self.second]

    def step(self, batch, ctx: StepContext) -> StepOutput:
        x, y = batch
        with ctx.autocast():
            logits = ctx.net(x)
        loss = F.cross_entropy(logits.float(), y)
        which = ctx.global_step % 2
        ctx.update(loss, [self.first, self.second][which])
        self.updates[which] += 1
        return StepOutput(loss, len(x), (logits.argmax(1) == y).sum())

    def evaluate(self, model, ctx):
        x, y = random_batch(99, 0)
        with torch.no_grad():
            return {"val_loss": F.cross_entropy(model(x), y).item()}

    def state_dict(self):
        return {"updates": list(self.updates)}

    def load_state_dict(self, state):
        self.updates = list(state["updates"])


def toy_model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


class Recorder(Callback):
    """Keeps what the engine hands its callbacks; `on_save` keeps a deep copy of the state."""

    def __init__(self, interrupt_at: int | None = None):
        self.steps: list[int] = []
        self.ended: list[dict] = []
        self.records: list[dict] = []
        self.saved: list[tuple[int, str, dict]] = []
        self.interrupt_at = interrupt_at

    def on_step(self, engine, count):
        self.steps.append(count)
        if len(self.steps) == self.interrupt_at:
            signal.raise_signal(signal.SIGTERM)  # lands on the engine's StopFlag

    def on_epoch_end(self, engine, record):
        self.ended.append(dict(record))

    def on_save(self, engine, state, epoch, stopped):
        self.saved.append((epoch, stopped, copy.deepcopy(state)))

    def on_record(self, engine, record):
        self.records.append(dict(record))


def toy_engine(epochs=2, *, resume=None, seed=0, callbacks=(), **kwargs):
    model = toy_model(seed)
    return Engine(
        model,
        Alternating(),
        GeneratedBatches(5, random_batch),
        epochs=epochs,
        callbacks=callbacks,
        resume=resume,
        **kwargs,
    )


def test_a_task_with_two_alternating_optimizers_on_a_generated_source():
    rec = Recorder()
    engine = toy_engine(3, schedule=lambda step: 0.5, callbacks=[rec])
    before = [p.detach().clone() for p in engine.model.parameters()]
    assert engine.run() == "completed"
    # each optimizer's own base lr, times the schedule's factor
    assert [g["lr"] for g in engine.task.first.param_groups] == [0.05]
    assert [g["lr"] for g in engine.task.second.param_groups] == [0.005]
    assert engine.task.updates == [8, 7]  # 15 steps, taking turns
    after = list(engine.model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    # the callbacks saw every step and every record, in order
    assert rec.steps == [8] * 15
    assert [r["epoch"] for r in rec.records] == [1, 2, 3] == [r["epoch"] for r in rec.ended]
    assert set(rec.records[0]) == {
        "epoch",
        "epochs",
        "train_loss",
        "train_acc",
        "lr",
        "images_per_s",
        "val_loss",
        "time_s",
        "elapsed_s",
    }
    assert rec.records == engine.history
    assert [(epoch, stopped) for epoch, stopped, _ in rec.saved] == [(1, "running"), (2, "running"), (3, "completed")]
    state = rec.saved[-1][2]
    assert isinstance(state["optimizer"], list) and len(state["optimizer"]) == 2
    assert state["task"] == {"updates": [8, 7]} and state["epoch"] == 3 and state["global_step"] == 15


def test_engine_resume_mid_epoch_is_exact():
    """SIGTERM from a callback after step 2 of epoch 2 (the loop sees it after step 3, saves and
    exits 143): the saved state continues to the same weights, EMA, task state and whole-epoch
    records as an uninterrupted run."""
    straight = toy_engine(3, ema=0.9)
    straight.run()

    rec = Recorder(interrupt_at=7)
    with pytest.raises(TrainingInterrupted) as stopped:
        toy_engine(3, ema=0.9, callbacks=[rec], output="toy.pt").run()
    assert stopped.value.exit_code == 143
    assert "in epoch 2/3 after step 3/5" in str(stopped.value) and "--resume toy.pt" in str(stopped.value)
    epoch, status, state = rec.saved[-1]
    assert (epoch, state["step"], status) == (1, 3, "interrupted")

    resumed = toy_engine(3, ema=0.9, resume=state, seed=123)  # other initial weights: the state wins
    resumed.run()
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.eval_model.state_dict().values(), resumed.eval_model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.task.updates == straight.task.updates
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]


def test_save_best_and_early_stopping_as_callbacks():
    losses = iter([1.0, 0.5, 0.7, 0.8, 0.9])

    class Scripted(Alternating):
        def evaluate(self, model, ctx):
            return {"val_loss": next(losses), "val_agreement": 0.5}

    best, early, rec = SaveBest(), EarlyStopping(patience=2), Recorder()
    model = toy_model()
    engine = Engine(model, Scripted(), GeneratedBatches(3, random_batch), epochs=5, callbacks=[best, early, rec])
    assert engine.run() == "early-stop"
    assert best.epoch == 2 and best.val_loss == 0.5 and early.bad_epochs == 2
    assert [r["epoch"] for r in rec.records] == [1, 2, 3, 4]
    assert rec.saved[-1][1] == "early-stop" and rec.saved[-1][2]["best_epoch"] == 2
    assert rec.records[0]["val_agreement"] == 0.5  # a task's own metrics reach the record


def test_a_non_finite_loss_metric_stops_as_diverged():
    class Broken(Alternating):
        def evaluate(self, model, ctx):
            return {"val_loss": float("nan")}

    engine = Engine(toy_model(), Broken(), GeneratedBatches(2, random_batch), epochs=2, output="m.pt")
    with pytest.raises(TrainingDiverged, match="validation loss became NaN/inf in epoch 1"):
        engine.run()


def classification_config(**overrides):
    from fakecifar.train import make_config

    return make_config(model="resnet20", batch_size=8, precision="fp32", device="cpu", **overrides)


def image_batch(epoch: int, step: int):
    gen = torch.Generator().manual_seed(1000 * epoch + step)
    x = torch.randn(8, 3, 8, 8, generator=gen)
    return x, {"labels": torch.arange(8) % 3}


def test_classification_task_with_an_online_teacher_and_snapshots(tmp_path):
    """What distillation needs: soft targets from a callable queried per step with that step's
    images (here a numpy 'teacher' returning log-probabilities), a resumable state of its own
    (the number of queries), extra per-epoch metrics; and per-epoch snapshots on disk."""
    from fakecifar.answers import softmax
    from fakecifar.checkpoint import load_checkpoint
    from fakecifar.models import build_model
    from fakecifar.training.classification import ClassificationTask

    seen: list[Any] = []

    def teacher(images: np.ndarray) -> np.ndarray:  # a black box: numpy in, log-probs out
        seen.append(images)
        logits = images.reshape(len(images), 3, -1).mean(axis=2) * 10
        return np.log(softmax(logits))

    class Online(ClassificationTask):
        queries = 0

        def soft_targets(self, x, cols, ctx):
            self.queries += len(x)
            return torch.from_numpy(teacher(x.detach().cpu().numpy())).to(x.device)

        def evaluate(self, model, ctx):
            return {"val_agreement": 1.0}

        def state_dict(self):
            return {"queries": self.queries}

        def load_state_dict(self, state):
            self.queries = state["queries"]

    config = classification_config(soft="kl", temperature=2.0, epochs=2)
    meta = {
        "arch": "resnet20",
        "arch_kwargs": {},
        "classes": CLASSES3,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "input_size": [8, 8],
    }
    rec = Recorder()
    torch.manual_seed(0)
    engine = Engine(
        build_model("resnet20", 3),
        Online(config, 3),
        GeneratedBatches(3, image_batch),
        epochs=2,
        callbacks=[rec, EpochSnapshots(tmp_path / "snap", meta)],
    )
    engine.run()
    assert len(seen) == 6 and seen[0].shape == (8, 3, 8, 8)
    assert np.array_equal(seen[0], image_batch(0, 0)[0].numpy())  # the step's own images
    assert rec.saved[-1][2]["task"] == {"queries": 48}
    assert all(r["val_agreement"] == 1.0 and np.isfinite(r["train_loss"]) for r in rec.records)
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["epoch-001.pt", "epoch-002.pt"]
    model, snap = load_checkpoint(tmp_path / "snap" / "epoch-002.pt")
    assert snap["train"]["epoch"] == 2
    for key, value in engine.eval_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_train_is_bitwise_a_plain_loop(make_shard, tmp_path):
    """`train()` through the engine gives exactly the weights of the loop a reader would write
    by hand with the same loader, augmentation, schedule and optimizer."""
    from fakecifar.augment import augment_batch, step_generator
    from fakecifar.checkpoint import load_checkpoint
    from fakecifar.loader import BatchLoader
    from fakecifar.models import build_model
    from fakecifar.shards import open_shards
    from fakecifar.train import dataset_mean_std, lr_factor, train

    data = open_shards([make_shard("t.h5", n=24)])
    config = classification_config(epochs=2, seed=3, channels_last=False)
    train(data, tmp_path / "m.pt", config)
    engine_weights = load_checkpoint(tmp_path / "m.pt")[0].state_dict()

    mean, std = dataset_mean_std(data)
    torch.manual_seed(3)
    loader = BatchLoader(data, 8, shuffle=True, seed=3, drop_last=True, mean=mean, std=std)
    model = build_model("resnet20", 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps, done = len(loader), 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        model.train()
        for step, (x, y) in enumerate(loader):
            x = augment_batch(x, ("crop", "flip"), pad=4, generator=step_generator(3, epoch, step))
            for group in opt.param_groups:
                group["lr"] = 0.1 * lr_factor(config, done, 2 * steps, steps)
            loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
    for key, value in model.state_dict().items():
        assert torch.equal(engine_weights[key], value), key


# ----------------------------------------------------------------------------- settings registry


def test_a_second_command_reuses_the_settings(tmp_path):
    """A `distill`-like command takes every train setting from the registry plus its own."""
    import typer
    from typer.testing import CliRunner

    from fakecifar.cli.common import with_settings
    from fakecifar.training.config import PANELS, RUN_SETTINGS, TRAIN_SETTINGS, make_config
    from fakecifar.training.settings import Setting, from_command_line

    teacher = (Setting("teacher", ("--teacher",), "The teacher to query.", type=Path, panel="Teacher"),)
    got: dict[str, Any] = {}
    app = typer.Typer(add_completion=False)

    @app.command()
    @with_settings(RUN_SETTINGS, [s for s in TRAIN_SETTINGS if s.name != "soft"], teacher, panels=("Teacher", *PANELS))
    def distill(inputs: list[str] = typer.Argument(None), **values: Any) -> None:
        got.update(values)

    result = CliRunner().invoke(app, ["a.h5", "--teacher", "t.onnx", "-e", "3", "--milestones", "1,2", "--no-tta"])
    assert result.exit_code == 0, result.output
    assert got["teacher"] == Path("t.onnx") and got["epochs"] == 3 and got["tta"] is False
    assert got["lr"] is None and got["output"] is None and got["onnx"] is False and "soft" not in got
    options = from_command_line([s for s in TRAIN_SETTINGS if s.name != "soft"], got)
    config = make_config(options.pop("recipe"), None, **options)
    assert config.milestones == [1.0, 2.0] and config.epochs == 3 and config.lr == 0.1
    text = CliRunner().invoke(app, ["--help"]).output
    assert text.index("--teacher") < text.index("--recipe") < text.index("--model") < text.index("--epochs")


def test_train_help_shows_every_setting(cli):
    from fakecifar.training.config import RUN_SETTINGS, TRAIN_SETTINGS

    text = cli("train", "--help").stdout
    for s in (*RUN_SETTINGS, *TRAIN_SETTINGS):
        for flag in (f for spec in s.flags for f in spec.split("/")):
            assert re.search(rf"(^|\s){re.escape(flag)}(,|\s|$)", text, re.M), flag
        assert s.help.split()[0] in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epochs": 0}, "--epochs must be at least 1, got 0"),
        ({"schedule": "saw"}, "unknown --schedule 'saw' (use cosine, onecycle, multistep, constant)"),
        ({"ema": 1.0}, "--ema must be in (0, 1), got 1.0"),
        ({"flip": "up"}, "unknown flip mode 'up'"),
        ({"warmup": 3, "epochs": 3}, "--warmup must be in [0, epochs), got 3"),
        ({"momentum": 0.0}, "Nesterov momentum needs --momentum > 0 (or --no-nesterov)"),
    ],
)
def test_settings_validate(overrides, message):
    from fakecifar.errors import UsageError
    from fakecifar.training.config import make_config

    with pytest.raises(UsageError) as error:
        make_config(**overrides)
    assert error.value.message == message
