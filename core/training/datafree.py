"""Data-free distillation tasks: a generator makes the images, the teacher answers them, the
student learns from the answers, and the generator learns to make images the student gets
wrong. One task per method, all on the training engine (fakecifar.training.loop): a step is
one iteration of the method (its generator and student updates, in the papers' order and
numbers); the batches are latent codes (`latent_batches`), a pure function of (seed, epoch,
step), and each step reseeds torch's RNG from the same, so a resumed run is the same run.

White-box (a local torch teacher: its gradients flow into the generator):
- `dafl` (Chen et al. 2019): the generator makes images the teacher is sure of (one-hot loss),
  that excite its features (activation loss) and that cover its classes (information entropy);
  the student learns them by KL at --temperature.
- `zskt` (Micaelli & Storkey 2019): adversarial belief matching -- the generator maximises the
  KL between teacher and student, the student minimises it, plus attention transfer on the
  stages both networks share (layer1..layer3 of the CIFAR ResNets).
- `dfad` (Fang et al. 2019): the same game on the L1 distance of the logits.

Black-box (answers only, through the query ledger; the victim's weights are never touched):
- `dfme` (Truong et al. 2021): the generator is trained through the victim with forward
  differences: m random unit directions per image, step epsilon; logits are recovered from
  probabilities (log-probabilities, centred), and the student learns them by L1.
- `dfms` (Sanyal et al. 2022, hard labels): the generator is first trained as a GAN on a proxy
  set (any images), then keeps a GAN loss against it plus a class-diversity loss measured on the
  student; the student learns the victim's labels by cross-entropy.

Every teacher call is metered by the run's ledger: white-box forwards with `ledger.charge`
(they cannot be cached), black-box answers with `ledger.ask` (cached: a replayed step after a
kill -9 is answered free). A step that the remaining budget cannot pay for in full is not
started: the run stops there (StopTraining "budget"), saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import step_generator
from ..models import find_stage
from ..priors import BatchNormPrior
from .classification import soft_loss
from .runtime import Dist, average_gradients, broadcast_main, gather_all, rank_seed
from .sources import GeneratedBatches
from .stopping import StopTraining
from .task import StepContext, StepOutput, Task

WHITE_BOX = ("dafl", "zskt", "dfad")
# Student updates per iteration when --student-steps is not given: the papers' own.
STUDENT_STEPS = {"dafl": 1, "zskt": 10, "dfad": 5, "dfme": 5, "dfms": 5}
LATENT_SALT = 0x7A  # the latent codes' draws are not the step's other draws


@dataclass
class DataFreeOptions:
    """A method's knobs (each a `distill` setting: fakecifar.distill_config)."""

    method: str
    latent: int = 256
    generator_width: int = 64
    generator_lr: float = 1e-3
    student_steps: int = 5  # student updates per iteration
    generator_steps: int = 1  # generator updates per iteration
    directions: int = 1  # dfme: random directions per image for the gradient estimate
    epsilon: float = 1e-3  # dfme: the forward-difference step
    attention: float = 250.0  # zskt: weight of attention transfer
    diversity: float = 1.0  # dfms: weight of the class-diversity loss
    proxy_epochs: int = 1  # dfms: GAN pre-training epochs on the proxy set
    replay: int = 0  # images of experience replay (0: off)
    bn_prior: float = 0.0  # dafl, zskt, dfad: weight of the teacher's batch-norm statistics prior


def queries_per_step(options: DataFreeOptions, batch: int) -> int:
    """Images one iteration asks the teacher about: what a step costs the budget."""
    m = options.method
    if m == "dafl":
        return batch * options.student_steps
    if m == "zskt":
        return batch * (options.generator_steps + 1)  # the student's targets: one forward
    if m == "dfad":
        return batch * (options.student_steps + options.generator_steps)
    if m == "dfme":
        return batch * (options.generator_steps * (options.directions + 1) + options.student_steps)
    if m == "dfms":
        return batch * options.student_steps
    raise ValueError(f"unknown method {m!r}")


def latent_batches(steps: int, batch: int, latent: int, seed: int, device: torch.device) -> GeneratedBatches:
    """`steps` latent batches per epoch, z ~ N(0, I) drawn from (seed, epoch, step)."""

    def make(epoch: int, step: int) -> torch.Tensor:
        g = step_generator(seed + LATENT_SALT, epoch, step)
        return torch.randn(batch, latent, generator=g).to(device)

    return GeneratedBatches(steps, make)


class TeacherAccess:
    """The teacher as the tasks see it, every call metered by `ledger`. `logits(x)` (white-box:
    differentiable in x, charged), `features_and_logits(x)` (also the input of its last linear
    layer and the outputs of its named stages), `soft(x)` (black-box: centred log-probabilities,
    no gradient), `labels(x)` (black-box: top-1)."""

    def __init__(
        self,
        teacher: Any,
        ledger: Any,
        device: torch.device,
        *,
        white_box: bool,
        stages: Sequence[str] = (),
        bn_prior: bool = False,
        dist: Dist | None = None,
    ):
        from ..teachers import BudgetExhausted

        self.teacher, self.ledger, self.device = teacher, ledger, device
        self.dist = dist or Dist()
        self.exhausted = BudgetExhausted
        # A black-box method gets no handle on the network, even of a .pt victim.
        self.module: nn.Module | None = teacher.module if white_box else None
        self.prior: BatchNormPrior | None = None
        self._captured: dict[str, torch.Tensor] = {}
        self.stage_names: list[str] = []
        if self.module is not None:
            self.module.eval()
            for p in self.module.parameters():
                p.requires_grad_(False)
            net = getattr(self.module, "model", self.module)
            linear = [m for m in net.modules() if isinstance(m, nn.Linear)]
            if linear:
                linear[-1].register_forward_hook(lambda _m, inp, _out: self._captured.__setitem__("features", inp[0]))
            self.prior = BatchNormPrior(net) if bn_prior else None
            for name in stages:
                sub = find_stage(net, name)
                if sub is not None:
                    self.stage_names.append(name)
                    sub.register_forward_hook(lambda _m, _i, out, key=name: self._captured.__setitem__(key, out))

    @property
    def spent(self) -> int:
        """Queries the ledger has counted (rank 0 keeps it; 0 on the other ranks)."""
        return int(self.ledger.spent) if self.ledger is not None else 0

    def affordable(self, n: int) -> bool:
        """Whether the budget pays for `n` more images on each process (all decide together)."""
        if self.ledger is not None:
            left = self.ledger.remaining
            ok = left is None or left >= n * self.dist.world_size
        else:
            ok = False
        return bool(broadcast_main(torch.tensor([float(ok)], device=self.device), self.dist).item())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]

    def features_and_logits(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        assert self.module is not None, "a white-box method needs a torch teacher"
        self._charge(len(x))
        self._captured.clear()
        if self.prior is not None:
            self.prior.reset()
        out = self.module(x)
        return dict(self._captured), out.float()

    def bn_prior(self) -> torch.Tensor:
        """The batch-norm statistics prior (fakecifar.priors) of the last white-box forward."""
        return self.prior.loss() if self.prior is not None else torch.zeros((), device=self.device)

    def soft(self, x: torch.Tensor) -> torch.Tensor:
        log_probs, _ = self.answers(x, soft=True)
        return log_probs - log_probs.mean(1, keepdim=True)  # logits up to a constant per image: recentred

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        return self.answers(x, soft=False)[1]

    def _charge(self, n: int) -> None:
        """Charge `n` white-box forwards of each process: rank 0 charges them all, for every
        process (each runs its own copy of the teacher in lockstep)."""
        self._on_main(lambda: self.ledger.charge(self.teacher, n * self.dist.world_size))

    def answers(self, x: torch.Tensor, *, soft: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities or an empty tensor, top-1 labels) of the teacher on `x`. Under
        torchrun rank 0 asks about every process's images in one metered call and hands each
        its rows: one ledger, one count, whatever the number of processes."""
        images = gather_all(x.detach().float().clamp(0, 1).contiguous(), self.dist)
        n, classes = len(x), self.teacher.num_classes
        log_probs = torch.zeros(len(images), classes if soft else 0, device=self.device)
        labels = torch.zeros(len(images), dtype=torch.int64, device=self.device)

        def ask() -> None:
            answers = self.ledger.ask(self.teacher, images.cpu().numpy())
            if soft:
                if answers.log_probs is None:
                    raise ValueError("the teacher answers labels only")
                log_probs.copy_(torch.from_numpy(answers.log_probs).float())
            labels.copy_(torch.from_numpy(answers.labels.astype("int64")))

        self._on_main(ask)
        rows = slice(self.dist.rank * n, (self.dist.rank + 1) * n)
        return broadcast_main(log_probs, self.dist)[rows], broadcast_main(labels, self.dist)[rows]

    def _on_main(self, call: Callable[[], None]) -> None:
        """Run `call` (a ledger operation) on rank 0 and tell every process how it went: a spent
        budget stops every process alike (StopTraining "budget"); a failure on rank 0 stops the
        others too, instead of leaving them waiting for an answer."""
        status, error = 0, None
        if self.dist.main:
            try:
                call()
            except Exception as exc:  # noqa: BLE001 -- re-raised below, once the others know
                status, error = (1 if isinstance(exc, self.exhausted) else 2), exc
        status = int(broadcast_main(torch.tensor([float(status)], device=self.device), self.dist).item())
        if status == 1:
            raise StopTraining("budget", str(error) if error else "the query budget is spent (see the ledger)")
        if status == 2:
            if error is not None:
                raise error
            raise RuntimeError("rank 0 failed to ask the teacher (its error is above)")


def attention_map(feature: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: the channel-mean of squared activations, L2-normalised;
    average-pooled to `size` first when given (a student and teacher of other resolutions)."""
    a = feature.float().pow(2).mean(1, keepdim=True)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a, size)
    return F.normalize(a.flatten(1), dim=1)


def class_entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy of the batch's mean class distribution: minimising it spreads the
    batch over the classes (DAFL's information entropy, DFMS's class diversity)."""
    p = F.softmax(logits, dim=1).mean(0)
    return (p * torch.log(p + 1e-8)).sum()


class ReplayBuffer:
    """Experience replay (MAZE, Kariyappa et al. 2021; DFMS): the last `size` generated images
    with the teacher's answers to them, so the student keeps learning from earlier queries at
    no further cost. Images are kept as float16 (about 5e-4 from what the teacher saw, well
    under one 8-bit level); a sample is drawn with torch's RNG, which each step reseeds."""

    def __init__(self, size: int):
        self.size, self.filled, self.next = int(size), 0, 0
        self.images: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.filled

    def add(self, x: torch.Tensor, target: torch.Tensor) -> None:
        x, target = x.detach()[: self.size], target.detach()[: self.size]
        if self.images is None or self.targets is None:
            self.images = torch.empty((self.size, *x.shape[1:]), dtype=torch.float16, device=x.device)
            self.targets = torch.empty((self.size, *target.shape[1:]), dtype=target.dtype, device=x.device)
        rows = (torch.arange(len(x), device=x.device) + self.next) % self.size
        self.images[rows] = x.to(torch.float16)
        self.targets[rows] = target
        self.next = int((self.next + len(x)) % self.size)
        self.filled = min(self.size, self.filled + len(x))

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.images is not None and self.targets is not None and self.filled
        rows = torch.randint(0, self.filled, (n,)).to(self.images.device)
        return self.images[rows].float(), self.targets[rows]

    def state_dict(self) -> dict[str, Any]:
        return {
            "images": None if self.images is None else self.images[: self.filled].cpu(),
            "targets": None if self.targets is None else self.targets[: self.filled].cpu(),
            "next": self.next,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if state.get("images") is None:
            return
        images, targets = state["images"].to(device), state["targets"].to(device)
        self.images = torch.empty((self.size, *images.shape[1:]), dtype=torch.float16, device=device)
        self.targets = torch.empty((self.size, *targets.shape[1:]), dtype=targets.dtype, device=device)
        self.filled, self.next = len(images), int(state["next"])
        self.images[: self.filled], self.targets[: self.filled] = images, targets


class DataFreeTask(Task):
    """What the methods share: the generator and its Adam, the student's SGD, normalisation of
    the generated [0, 1] images for the student, the per-step reseeding, the budget check
    before a step, per-epoch reporting (student accuracy on --val, reported only) and the
    state a resume needs (the generator's weights; the optimizers are the loop's)."""

    def __init__(
        self,
        config: Any,
        options: DataFreeOptions,
        access: TeacherAccess,
        generator: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        val: Any = None,
        seed: int = 0,
    ):
        self.config, self.options, self.access, self.generator = config, options, access, generator
        self.mean_list, self.std_list, self.val = list(mean), list(std), val
        self.dist = access.dist
        self.seed = rank_seed(seed, self.dist)  # each process its own draws
        self.generator_loss_sum, self.generator_updates = 0.0, 0
        self.replay = ReplayBuffer(options.replay) if options.replay else None

    # -- the engine's interface

    def setup(self, model: nn.Module, device: torch.device) -> None:
        c = self.config
        self.device = device
        self.generator.to(device)
        self.mean = torch.tensor(self.mean_list, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(self.std_list, device=device).view(1, -1, 1, 1)
        self.student_opt = torch.optim.SGD(
            model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov
        )
        self.generator_opt = torch.optim.Adam(self.generator.parameters(), lr=self.options.generator_lr)
        self.extra_setup(device)

    def extra_setup(self, device: torch.device) -> None:
        pass

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.student_opt, self.generator_opt]

    def step(self, batch: torch.Tensor, ctx: StepContext) -> StepOutput:
        cost = queries_per_step(self.options, len(batch))  # this process's; every process asks as much
        if not self.access.affordable(cost):
            total = cost * self.dist.world_size
            raise StopTraining(
                "budget", f"the query budget cannot pay for another step ({total:,} queries: see the ledger)"
            )
        torch.manual_seed(step_generator(self.seed, ctx.epoch, ctx.step).initial_seed())
        self.generator.train()
        self.step_generator_loss = torch.zeros(())
        loss, count = self.iterate(batch, ctx)
        return StepOutput(loss.detach(), count, watch={"generator loss": self.step_generator_loss})

    def iterate(self, z: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, int]:
        """One iteration of the method: (the last student loss, images the student learned)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        out = {
            "generator_loss": self.generator_loss_sum / max(self.generator_updates, 1),
            "queries": float(self.access.spent),  # so far: the x axis of accuracy-vs-queries
        }
        self.generator_loss_sum, self.generator_updates = 0.0, 0
        if self.val is not None:
            from .classification import _validate

            out["val_loss"], out["val_acc"] = _validate(
                model, self.val, self.config, self.num_classes, ctx.amp_dtype, ctx.device, ctx.dist
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": {k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()},
            "replay": self.replay.state_dict() if self.replay is not None else None,
            "generator_loss": [self.generator_loss_sum, self.generator_updates],  # this epoch's so far
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.generator_loss_sum, self.generator_updates = state.get("generator_loss", [0.0, 0])
        if self.replay is not None and state.get("replay"):
            self.replay.load_state_dict(state["replay"], self.device)

    # -- shared pieces

    @property
    def num_classes(self) -> int:
        return self.access.teacher.num_classes

    def student(self, ctx: StepContext, x01: torch.Tensor) -> torch.Tensor:
        with ctx.autocast():
            return ctx.net((x01 - self.mean) / self.std).float()

    def learn(
        self,
        ctx: StepContext,
        x: torch.Tensor,
        target: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """One student update on images `x` and the teacher's `target`s for them, with a batch
        of earlier ones from the replay buffer beside them (when there is one)."""
        xs, ts = x, target
        if self.replay is not None:
            if len(self.replay):
                xr, tr = self.replay.sample(len(x))
                xs, ts = torch.cat([x, xr]), torch.cat([target, tr])
            # Every process keeps the same buffer (all processes' images), so the one rank 0
            # saves is every process's on resume.
            self.replay.add(gather_all(x.detach(), self.dist), gather_all(target.detach(), self.dist))
        loss = loss_fn(self.student(ctx, xs), ts)
        self.update_student(ctx, loss)
        return loss

    def update_student(self, ctx: StepContext, loss: torch.Tensor) -> None:
        gate_loss = getattr(ctx.model, "gate_loss", None)  # gated students: their sparsity term
        if gate_loss is not None:
            loss = loss + gate_loss()
        ctx.update(loss, self.student_opt)

    def update_generator(self, loss: torch.Tensor) -> None:
        self.generator_opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.generator, self.dist)
        self.generator_opt.step()
        self.note_generator(loss)

    def note_generator(self, loss: torch.Tensor) -> None:
        self.step_generator_loss = loss.detach()
        self.generator_loss_sum += float(loss.detach())
        self.generator_updates += 1

    def prior_loss(self) -> torch.Tensor:
        """--bn-prior times the teacher's batch-norm prior on the images of its last forward."""
        if not self.options.bn_prior:
            return torch.zeros((), device=self.device)
        return self.options.bn_prior * self.access.bn_prior()

    def fresh_z(self, z: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(z)


class DAFL(DataFreeTask):
    def kd(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return soft_loss("kl", s, t, self.config.temperature)

    def iterate(self, z, ctx):
        loss = torch.zeros(())
        for i in range(self.options.student_steps):
            zi = z if i == 0 else self.fresh_z(z)
            x = self.generator(zi)
            captured, t = self.access.features_and_logits(x)
            features = captured.get("features", t)
            one_hot = F.cross_entropy(t, t.argmax(1))
            activation = -features.abs().mean()
            g_loss = one_hot + 0.1 * activation + 5.0 * class_entropy_loss(t) + self.prior_loss()
            self.update_generator(g_loss)
            loss = self.learn(ctx, x.detach(), t.detach(), self.kd)
        return loss, len(z) * self.options.student_steps


STAGES = ("layer1", "layer2", "layer3")


class ZSKT(DataFreeTask):
    def extra_setup(self, device):
        self.student_maps: dict[str, torch.Tensor] = {}

    def attach(self, model: nn.Module) -> list[str]:
        stages = {s: find_stage(model, s) for s in STAGES}
        shared = [s for s in STAGES if stages[s] is not None and s in self.access.stage_names]
        for s in shared:
            module = stages[s]
            assert module is not None
            module.register_forward_hook(lambda _m, _i, out, key=s: self.student_maps.__setitem__(key, out))
        return shared

    def iterate(self, z, ctx):
        if not hasattr(self, "shared"):
            self.shared = self.attach(ctx.model)
        for _ in range(self.options.generator_steps):
            x = self.generator(z)
            t = self.access.logits(x)
            s = self.student(ctx, x)
            g_loss = -soft_loss("kl", s, t, 1.0) + self.prior_loss()
            self.update_generator(g_loss)
        x = self.generator(z).detach()
        with torch.no_grad():
            captured, t = self.access.features_and_logits(x)
        loss = torch.zeros(())
        for _ in range(self.options.student_steps):
            s = self.student(ctx, x)
            loss = soft_loss("kl", s, t, 1.0)
            for name in self.shared:
                s_map, t_map = self.student_maps[name], captured[name]
                # at the coarser of the two resolutions (e.g. a +stem2 student of a plain teacher)
                size = (min(s_map.shape[-2], t_map.shape[-2]), min(s_map.shape[-1], t_map.shape[-1]))
                a_s, a_t = attention_map(s_map, size), attention_map(t_map, size)
                loss = loss + self.options.attention * (a_s - a_t).pow(2).mean()
            self.update_student(ctx, loss)
        return loss, len(z) * self.options.student_steps


class DFAD(DataFreeTask):
    def iterate(self, z, ctx):
        loss = torch.zeros(())
        for i in range(self.options.student_steps):
            x = self.generator(z if i == 0 else self.fresh_z(z)).detach()
            with torch.no_grad():
                t = self.access.logits(x)
            loss = self.learn(ctx, x, t, F.l1_loss)
        for _ in range(self.options.generator_steps):
            x = self.generator(self.fresh_z(z))
            g_loss = -F.l1_loss(self.student(ctx, x), self.access.logits(x)) + self.prior_loss()
            self.update_generator(g_loss)
        return loss, len(z) * self.options.student_steps


class DFME(DataFreeTask):
    """The generator's gradient through the victim is estimated by forward differences
    (zeroth order): for each image x and m random unit directions u, grad ~ d/m * sum
    (L(x + eps u) - L(x)) / eps * u, where L is the per-image L1 student-victim disagreement
    and d the image's dimension (Truong et al. 2021). Each of the m + 1 points is a query."""

    def iterate(self, z, ctx):
        o = self.options
        for _ in range(o.generator_steps):
            x = self.generator(z)
            xd = x.detach()
            n, dim = len(xd), xd[0].numel()
            u = F.normalize(torch.randn(n, o.directions, dim, device=xd.device), dim=2)
            points = torch.cat(
                [xd.unsqueeze(1), (xd.flatten(1).unsqueeze(1) + o.epsilon * u).view(n, -1, *xd.shape[1:])], 1
            )
            flat = points.view(n * (o.directions + 1), *xd.shape[1:]).clamp(0, 1)
            t = self.access.soft(flat)
            # The differences are ~1e-4: in fp32 (bf16 would round them away) and in eval mode
            # (BatchNorm statistics and a gated student's random gates would swamp them).
            was_training = ctx.model.training
            ctx.model.eval()
            with torch.no_grad():
                s = ctx.model((flat - self.mean) / self.std).float()
            ctx.model.train(was_training)
            per_point = (s - t).abs().mean(1).view(n, o.directions + 1)
            diff = (per_point[:, 1:] - per_point[:, :1]) / o.epsilon  # (n, m)
            grad = (dim / o.directions) * (diff.unsqueeze(2) * u).sum(1).view_as(xd)
            self.generator_opt.zero_grad(set_to_none=True)
            x.backward(-grad / n)  # ascend the disagreement
            average_gradients(self.generator, self.dist)
            self.generator_opt.step()
            self.note_generator(-per_point[:, 0].mean())
        loss = torch.zeros(())
        for i in range(o.student_steps):
            x = self.generator(z if i == 0 else self.fresh_z(z)).detach()
            loss = self.learn(ctx, x, self.access.soft(x), F.l1_loss)
        return loss, len(z) * o.student_steps


class DFMS(DataFreeTask):
    """`proxy` ([N, H, W, 3] uint8 images of any source) keeps the generator's images natural:
    a discriminator tells them from the generator's, first for `proxy_epochs` of plain GAN
    pre-training (no query), then beside the class-diversity loss on the student."""

    def __init__(self, *args: Any, proxy: torch.Tensor, discriminator: nn.Module, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.proxy, self.discriminator = proxy, discriminator
        self.pretrained = False

    def extra_setup(self, device):
        self.discriminator.to(device)
        self.discriminator_opt = torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.generator_opt.param_groups[0]["betas"] = (0.5, 0.999)

    def optimizers(self):
        return [self.student_opt, self.generator_opt, self.discriminator_opt]

    def real_batch(self, n: int) -> torch.Tensor:
        rows = torch.randint(0, len(self.proxy), (n,))
        return self.proxy[rows].to(self.device).permute(0, 3, 1, 2).float().div_(255)

    def gan_step(self, z: torch.Tensor, extra: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        x = self.generator(z)
        real, fake = self.discriminator(self.real_batch(len(z))), self.discriminator(x.detach())
        d_loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(
            fake, torch.zeros_like(fake)
        )
        self.discriminator_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        average_gradients(self.discriminator, self.dist)
        self.discriminator_opt.step()
        judged = self.discriminator(x)
        g_loss = F.binary_cross_entropy_with_logits(judged, torch.ones_like(judged))
        if extra is not None:
            g_loss = g_loss + extra(x)
        self.update_generator(g_loss)

    def pretrain(self, steps: int, batch: int, latent: int, on_step: Callable[[int], None] | None = None) -> None:
        """GAN pre-training on the proxy set: `steps` generator/discriminator updates."""
        g = torch.Generator().manual_seed(self.seed + 0x6D73)
        for i in range(steps):
            torch.manual_seed(g.initial_seed() + i)
            self.gan_step(torch.randn(batch, latent, generator=g).to(self.device))
            if on_step:
                on_step(i)
        self.pretrained = True
        self.generator_loss_sum, self.generator_updates = 0.0, 0  # epoch 1 reports the stealing only

    def iterate(self, z, ctx):
        for _ in range(self.options.generator_steps):
            self.gan_step(z, lambda x: self.options.diversity * class_entropy_loss(self.student(ctx, x)))
        loss = torch.zeros(())
        for i in range(self.options.student_steps):
            x = self.generator(z if i == 0 else self.fresh_z(z)).detach()
            loss = self.learn(ctx, x, self.access.labels(x), F.cross_entropy)
        return loss, len(z) * self.options.student_steps

    def state_dict(self):
        return {
            **super().state_dict(),
            "discriminator": {k: v.detach().cpu().clone() for k, v in self.discriminator.state_dict().items()},
            "pretrained": self.pretrained,
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.discriminator.load_state_dict(state["discriminator"])
        self.pretrained = bool(state.get("pretrained", True))  # a saved run is past its pre-training


TASKS: dict[str, type[DataFreeTask]] = {"dafl": DAFL, "zskt": ZSKT, "dfad": DFAD, "dfme": DFME, "dfms": DFMS}


def proxy_steps(options: DataFreeOptions, proxy_images: int, batch: int) -> int:
    """GAN pre-training updates of dfms: `proxy_epochs` passes over the proxy set."""
    return options.proxy_epochs * math.ceil(proxy_images / batch)
