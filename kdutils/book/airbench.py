"""A strong CIFAR-10 teacher in minutes: the airbench94 recipe (chapter "A strong teacher").

The book's own implementation of the recipe published by Keller Jordan in
*cifar10-airbench* (94.0% in 9.9 epochs on the original CIFAR-10 files). Its parts:

* :class:`AirbenchNet`: a frozen 2x2 whitening convolution, three conv groups
  (conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU, widths 64/256/256), BatchNorm
  without a learnable scale, logits multiplied by 1/9.
* :func:`whitening_weights`: the first layer's filters are the eigenvectors of the 2x2
  patches' covariance (and their negatives), scaled by ``1/sqrt(eigenvalue)``.
* :func:`train_airbench`: label smoothing, Nesterov SGD with learning rate and weight decay
  per 1,024 examples (summed loss), 64x the learning rate for BN biases, warm-up over 23% of
  the steps then linear decay, and a lookahead average of the weights every 5 steps.
* Data: every image flipped at random once, then the whole set flipped every other epoch;
  a random translation of up to 2 pixels (reflection padding) every epoch.
* :func:`predict_tta`: test-time flip and 1-pixel translations.

:func:`get_strong_teacher` trains it once and caches it like every other teacher.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn

from .. import settings
from ..checkpoint import CheckpointError, atomic_save, load_checkpoint, load_state_dict_strict
from ..data import ImageData, TensorLoader, normalize, random_crop_flip
from ..dist import world
from ..fingerprint import code_fingerprint, is_stale
from ..loop import TrainingDiverged, freeze
from ..results import make_record, write_record
from ..runs import Run, existing_record, is_finished, run_key
from ..settings import RunOptions
from ..speed import Speed, speed_record
from ..train import pick_device


@dataclass(frozen=True)
class AirbenchRecipe:
    """Every value of the recipe that changes the result (the published values by default)."""

    epochs: float = 9.9
    batch_size: int = 1024
    lr: float = 11.5                 # per 1,024 examples (the loss is summed, not averaged)
    momentum: float = 0.85           # Nesterov
    weight_decay: float = 0.0153     # per 1,024 examples, decoupled from the learning rate
    bias_scaler: float = 64.0        # learning-rate multiplier of the BatchNorm biases
    label_smoothing: float = 0.2
    whiten_bias_epochs: int = 3      # the whitening layer's bias trains this long, then freezes
    translate: int = 2               # pixels
    tta_level: int = 2               # 0 none, 1 flip, 2 flip + translate
    widths: tuple = (64, 256, 256)
    bn_momentum: float = 0.6         # weight of the old running statistics
    seed: int = 0

    def __post_init__(self):
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.tta_level not in (0, 1, 2):
            raise ValueError(f"tta_level must be 0, 1 or 2, got {self.tta_level}")


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1 (not trained); only the bias learns."""

    def __init__(self, channels: int, momentum: float):
        super().__init__(channels, eps=1e-12, momentum=1 - momentum)
        self.weight.requires_grad_(False)


class _ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int, bn_momentum: float):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding="same", bias=False)
        self.norm1 = _BatchNorm(cout, bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding="same", bias=False)
        self.norm2 = _BatchNorm(cout, bn_momentum)
        for conv in (self.conv1, self.conv2):  # start close to the identity on the first channels
            w = conv.weight.data
            nn.init.dirac_(w[: w.size(1)])

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """The airbench94 network: 2x2 whitening conv (24 filters, frozen), three conv groups,
    3x3 max-pool, a bias-free linear head, logits times 1/9. 1.97 M parameters, 0.24 GFLOPs
    per 32 px image. ``forward(x, return_features=True)`` also returns the pooled 256-value
    features."""

    def __init__(self, num_classes: int = 10, widths=(64, 256, 256), bn_momentum: float = 0.6,
                 scale: float = 1 / 9):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        chans = (24, *widths)
        self.groups = nn.Sequential(*(_ConvGroup(a, b, bn_momentum) for a, b in zip(chans, chans[1:])))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.scale = scale

    def forward(self, x, return_features: bool = False):
        h = self.groups(F.gelu(self.whiten(x)))
        h = torch.flatten(F.max_pool2d(h, 3), 1)
        logits = self.head(h) * self.scale
        return (logits, h) if return_features else logits


def whitening_weights(images: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """The 24 filters of the whitening layer from normalised images ``(N, 3, H, W)``.

    Every 2x2 patch is a 12-value vector; the eigenvectors ``v_i`` of their covariance,
    divided by ``sqrt(lambda_i + eps)``, decorrelate the patches and give each direction unit
    variance. The layer holds ``v_i`` and ``-v_i`` (so a GELU after it loses no sign),
    largest eigenvalue first: shape ``(24, 3, 2, 2)``.
    """
    c = images.shape[1]
    patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)           # N, C, H-1, W-1, 2, 2
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4)      # one row per patch
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)                  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
    filters = (eigenvectors / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, 2, 2)
    return torch.cat([filters, -filters])


def build_airbench(seed: int, data: ImageData, recipe: AirbenchRecipe = AirbenchRecipe(),
                   whiten_images: int = 5000) -> AirbenchNet:
    """A fresh network, weights from ``seed``, whitening filters from the first
    ``whiten_images`` training images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = AirbenchNet(len(data.classes), recipe.widths, recipe.bn_momentum)
    net.arch = "airbench"
    x = normalize(data.train_x[:whiten_images], data.mean, data.std)
    net.whiten.weight.data.copy_(whitening_weights(x))
    return net


def lr_factor(step: int, total: int) -> float:
    """Learning-rate multiplier: 0.2 -> 1 linearly over the first 23% of steps, then -> 0.07."""
    warmup = int(total * 0.23)
    if step < warmup:
        return 0.2 + 0.8 * step / warmup
    return 1.0 + (0.07 - 1.0) * (step - warmup) / (total - warmup)


def _optimizer(net: nn.Module, r: AirbenchRecipe) -> torch.optim.SGD:
    # With Nesterov momentum a constant gradient g makes steps of lr * g * (1 + 1/(1-m)):
    # dividing by that keeps the step scale independent of the momentum.
    per_example = 1024 * (1 + 1 / (1 - r.momentum))
    lr = r.lr / per_example
    wd = r.weight_decay * r.batch_size / per_example
    lr_bias = lr * r.bias_scaler
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    norm_biases = [p for n, p in trainable if "norm" in n]
    others = [p for n, p in trainable if "norm" not in n]
    return torch.optim.SGD([dict(params=norm_biases, lr=lr_bias, weight_decay=wd / lr_bias),
                            dict(params=others, lr=lr, weight_decay=wd / lr)],
                           momentum=r.momentum, nesterov=True)


class AirbenchBatches:
    """The training images of every epoch, normalised, flipped and translated as a whole.

    Each image gets one random flip at the start (from ``seed``); the whole set is flipped
    again every other epoch, so an image is seen both ways in every two epochs. Each epoch
    every image is shifted by up to ``translate`` pixels (reflection padding). Order and
    shifts follow from ``(seed, epoch)``: a resumed run sees the same batches.
    """

    def __init__(self, data: ImageData, batch_size: int, *, seed: int, translate: int,
                 device: torch.device, channels_last: bool = False):
        self.data, self.batch_size, self.seed, self.translate = data, batch_size, seed, translate
        self.device, self.channels_last = device, channels_last
        x = normalize(data.train_x.to(device), data.mean, data.std)
        g = torch.Generator().manual_seed(seed)
        flip = (torch.rand(len(x), generator=g) < 0.5).to(device)
        self.x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        # padded once: mirroring commutes with the symmetric reflection padding
        p = translate
        self.padded = F.pad(self.x, (p, p, p, p), mode="reflect") if p else self.x
        self.y = data.train_y.to(device)

    def __len__(self) -> int:
        return len(self.y) // self.batch_size  # the last, incomplete batch is dropped

    def epoch(self, epoch: int):
        """Yields ``(images, labels, indices)`` for ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        x = self.padded.flip(-1) if epoch % 2 == 1 else self.padded
        if self.translate:
            x = random_crop_flip(x, g, pad=0, size=self.x.shape[-1], flip=False)
        order = torch.randperm(len(self.y), generator=g).to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            xb = x[idx]
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y[idx], idx


@torch.no_grad()
def predict_tta(net: nn.Module, x: torch.Tensor, level: int = 2) -> torch.Tensor:
    """Logits averaged over test-time views: ``level`` 0 the image, 1 also its mirror,
    2 also the mirror pair of two 1-pixel diagonal shifts (reflection padding)."""
    def mirrored(v):
        return 0.5 * (net(v) + net(v.flip(-1))) if level >= 1 else net(v)
    logits = mirrored(x)
    if level < 2:
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = 0.5 * (mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2:h + 2, 2:w + 2]))
    return 0.5 * logits + 0.5 * shifted


@torch.no_grad()
def accuracy(net: nn.Module, data: ImageData, device, *, tta_level: int = 0,
             batch_size: int = 1000, channels_last: bool = False,
             amp: torch.dtype | None = None) -> float:
    """Test accuracy in percent, with test-time augmentation ``tta_level``, under autocast to
    ``amp`` when given (the precision the network trained in)."""
    was = net.training
    net.eval()
    loader = TensorLoader(data.test_x, data.test_y, batch_size, shuffle=False, mean=data.mean,
                          std=data.std, device=device, channels_last=channels_last)
    device_type = torch.device(device).type
    with torch.autocast(device_type, amp or torch.float32, enabled=amp is not None):
        correct = sum((predict_tta(net, x, tta_level).argmax(1) == y).sum().item()
                      for x, y, _ in loader)
    net.train(was)
    return 100.0 * correct / len(data.test_y)


def _run_paths(data: ImageData, recipe: AirbenchRecipe, options: RunOptions):
    key = run_key(chapter="teacher", method="airbench", recipe=asdict(recipe), data=data.source,
                  train=len(data.train_y), test=len(data.test_y), model="AirbenchNet")
    name = f"airbench-{options.profile}-seed{recipe.seed}-{key}"
    return (key, settings.ckpt_dir(options.ckpt_dir) / "teacher" / f"{name}.pt",
            settings.results_dir(options.results_dir) / "teacher" / f"{name}.json")


def train_airbench(data: ImageData, recipe: AirbenchRecipe = AirbenchRecipe(), *, speed=None,
                   options: RunOptions = RunOptions()):
    """Train :class:`AirbenchNet` by ``recipe`` (or reload it); a checkpoint every epoch.

    Returns a :class:`~kdutils.runs.Run`; its record's ``test_acc`` is the accuracy with
    test-time augmentation (``tta_level``), ``test_acc_plain`` the one without, and the
    history holds the plain test accuracy after every epoch with the seconds it took.
    ``speed`` (a :class:`kdutils.speed.Speed`; default ``Speed()``) chooses the precision and
    memory layout as :func:`kdutils.train.fit` does: speed, not the recipe.
    """
    dev = pick_device(options.device)
    key, ckpt, record_path = _run_paths(data, recipe, options)
    t0 = time.perf_counter()
    net = build_airbench(recipe.seed, data, recipe)
    setup_s = time.perf_counter() - t0
    # what this teacher's numbers depend on besides the recipe: its training and test code
    code = code_fingerprint(_airbench_epoch, _optimizer, lr_factor, AirbenchBatches, accuracy, net)
    n_batches = len(data.train_y) // recipe.batch_size
    if n_batches == 0:
        raise ValueError(f"the training set has {len(data.train_y)} images, fewer than one batch "
                         f"({recipe.batch_size}): lower batch_size")
    total = math.ceil(n_batches * recipe.epochs)
    epochs = math.ceil(total / n_batches)
    speed = speed or Speed()
    setting = speed.resolve(net, dev, recipe.batch_size, data.train_x.shape[-1],
                            cache=settings.ckpt_dir(options.ckpt_dir) / "speed" / "cpu_choices.json",
                            measure=speed.measure and not is_finished(ckpt, epochs, code))
    net = net.to(dev, memory_format=torch.channels_last if setting["channels_last"] else torch.contiguous_format)
    opt = _optimizer(net, recipe)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total))
    state = _resume(ckpt, key, code, net, opt, sched, dev)
    history, start = state[1], state[2]
    progress = options.progress and start < epochs
    with _bar(progress, total, state[3], recipe.seed) as bar:
        step = _train_epochs(net, data, recipe, opt, sched, setting, dev, state, total, epochs,
                             bar, lambda epoch, step: atomic_save(
                                 {"key": key, "epoch": epoch, "step": step, "model": net.state_dict(),
                                  "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                  "average": state[0], "history": history, "code": code}, ckpt))
    kept = existing_record(record_path, ckpt, history) if start == epochs else None
    if kept is not None:
        return Run(net.eval(), kept, ckpt, record_path, start)
    record = _airbench_record(net, data, recipe, options.profile, dev, history, key, setup_s, step, setting)
    record["code"] = code
    write_record(record, record_path)
    return Run(net.eval(), record, ckpt, record_path, start)


def _bar(show: bool, total: int, initial: int, seed: int):
    if not show:
        return nullcontext()
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, mininterval=2, leave=False,
                desc=f"airbench teacher seed {seed}")


def _train_epochs(net, data, recipe, opt, sched, setting, dev, state, total: int, epochs: int,
                  bar, save) -> int:
    """The epochs from the resumed ``state`` (average, history, next epoch, step) on, each
    followed by the plain test accuracy and ``save(epoch, step)``; returns the last step."""
    average, history, start, step = state
    amp, cl = setting["amp"], setting["channels_last"]
    scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None
    batches = AirbenchBatches(data, recipe.batch_size, seed=recipe.seed,
                              translate=recipe.translate, device=dev, channels_last=cl)
    # lookahead: every 5 steps the weights and their running average move together; the
    # average's decay grows from 0 to 0.95^5 over training (see _lookahead)
    decay = 0.95 ** 5 * (torch.arange(total + 1) / total) ** 3
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing, reduction="sum")
    for epoch in range(start, epochs):
        t_epoch = time.perf_counter()
        net.whiten.bias.requires_grad_(epoch < recipe.whiten_bias_epochs)
        train_loss, step = _airbench_epoch(net, batches.epoch(epoch), loss_fn, opt, sched,
                                           scaler, amp, step, total, average, decay, bar)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"loss became {train_loss} in epoch {epoch + 1}")
        acc = accuracy(net, data, dev, channels_last=cl, amp=amp)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "test_acc": acc,
                        "lr": opt.param_groups[1]["lr"], "steps": step,
                        "seconds": time.perf_counter() - t_epoch})
        if bar is not None:
            bar.set_postfix(epoch=epoch + 1, acc=f"{acc:.2f}")
        save(epoch + 1, step)
    return step


def _resume(ckpt, key: str, code: dict, net, opt, sched, dev) -> tuple[dict, list, int, int]:
    """The lookahead average, history, next epoch and step from ``ckpt`` (loaded into ``net``,
    ``opt`` and ``sched``); a fresh start without a checkpoint or when other code made it."""
    state = load_checkpoint(ckpt, map_location=dev) if ckpt.is_file() else None
    if state is not None and state.get("key") != key:
        raise CheckpointError(f"checkpoint {ckpt} belongs to another run; delete it to start over")
    if state is None or is_stale(state.get("code"), code, ckpt.name):
        return {k: v.clone() for k, v in net.state_dict().items()}, [], 0, 0
    load_state_dict_strict(net, state["model"], str(ckpt))
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return ({k: v.to(dev) for k, v in state["average"].items()}, state["history"], state["epoch"],
            state["step"])


def _airbench_epoch(net, batches, loss_fn, opt, sched, scaler, amp, step: int, total: int,
                    average: dict, decay: torch.Tensor, bar) -> tuple[float, int]:
    """One epoch of the recipe's steps (it stops at ``total`` steps, mid-epoch if need be),
    with the lookahead every 5 steps; returns the mean loss per image and the step count."""
    net.train()
    losses = []
    for x, y, _ in batches:
        if step >= total:
            break
        with torch.autocast(x.device.type, amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        step += 1
        losses.append(loss.detach() / len(y))
        if step % 5 == 0 or step == total:
            _lookahead(net, average, 1.0 if step == total else decay[step].item())
        if bar is not None:
            bar.update(1)
    return torch.stack(losses).mean().item(), step


def _airbench_record(net, data, recipe, profile, dev, history, key, setup_s, steps, setting) -> dict:
    """The teacher's record: accuracy with test-time augmentation (measured here) and without."""
    t_eval = time.perf_counter()
    tta = accuracy(net, data, dev, tta_level=recipe.tta_level, channels_last=setting["channels_last"],
                   amp=setting["amp"])
    eval_s = time.perf_counter() - t_eval
    train_s = sum(h["seconds"] for h in history)
    record = make_record(chapter="teacher", method="airbench", profile=profile, device=dev,
                         data=data, recipe=recipe, params={}, history=history, model=net,
                         key=key, teacher_key=None, wall_time_s=setup_s + train_s + eval_s,
                         extra={"test_acc_plain": history[-1]["test_acc"],
                                "tta_eval_s": round(eval_s, 2), "setup_s": round(setup_s, 2),
                                "steps": steps,
                                "speed": speed_record(setting)})
    record["test_acc"] = tta
    return record


@torch.no_grad()
def _lookahead(net: nn.Module, average: dict, decay: float) -> None:
    """Move the running average towards the weights by ``1 - decay`` (decay grows from 0 to
    0.77 over training: the average leans more on its own past as training ends); the weights
    take it."""
    for (name, avg), value in zip(average.items(), net.state_dict().values()):
        if value.is_floating_point():
            avg.lerp_(value, 1 - decay)
            value.copy_(avg)


def get_strong_teacher(data: ImageData, recipe: AirbenchRecipe = AirbenchRecipe(), *,
                       speed=None, options: RunOptions = RunOptions()):
    """The airbench teacher for ``data``: loaded when a finished checkpoint exists, else
    trained (a file lock makes a second process wait and then load it). Frozen on return."""
    folder = settings.ckpt_dir(options.ckpt_dir) / "teacher"
    folder.mkdir(parents=True, exist_ok=True)
    lock = nullcontext() if world().distributed else FileLock(str(folder / "airbench.lock"))
    with lock:
        run = train_airbench(data, recipe, speed=speed, options=options)
    freeze(run.model)
    return run
