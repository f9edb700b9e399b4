"""`fsdeploy distill`: train a small student backbone from a teacher with L2T-ww, or a plain baseline.

Methods (the paper's comparison, Jang et al., ICML 2019, Table 1/2):
- `l2t-ww`: cross-entropy on the labelled data + β·L_wfm with meta-learned channel ("what") and pair
  ("where") weights, meta-networks updated by lookahead (see fsdeploy.train.l2tww);
- `uniform`: the same matching loss over the same pairs with every channel and pair weighted equally
  (feature matching, "FM" in the paper); no meta-networks;
- `finetune`: cross-entropy only. From random init this is the student trained directly ("scratch");
  with `student_checkpoint` it is plain fine-tuning of those weights.

Optimisation as the official code (alinlab/L2T-ww, train_l2t_ww.py): student SGD (lr 0.1, momentum 0.9, weight
decay 1e-4, cosine over epochs), meta-networks Adam (lr 1e-4, weight decay 1e-4), β = 0.5, T = 2 inner steps,
pair weights relu6 with bias 1. Augmentation is `fsdeploy pretrain`'s (mild random resized crop and rotation in
one affine warp, no flips, since glyphs are the target). Each iteration: one real step on CE + β·L_wfm, then one meta step on the same
batch. Images go through the teacher's preprocessing, and the student checkpoint records it.
"""
from __future__ import annotations

import math
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsdeploy.backbones import Preprocess, create_backbone, read_checkpoint, save_checkpoint
from fsdeploy.deps import require
from fsdeploy.errors import InvalidInput
from fsdeploy.train.pretrain import _augment

METHODS = ("l2t-ww", "uniform", "finetune")


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run's settings (recorded in the student checkpoint)."""

    teacher: str  # timm name or a checkpoint file
    student: str
    data: Path
    out: Path
    method: str = "l2t-ww"
    split: str = "base"
    img_size: int | None = None  # default: the teacher's
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    beta: float = 0.5
    meta_lr: float = 1e-4
    meta_weight_decay: float = 1e-4
    inner_steps: int = 2
    pair_init: float = 1.0
    pairs: str = "all"
    student_checkpoint: Path | None = None
    max_steps: int | None = None  # stop after this many iterations (smoke runs)
    aug_scale: float = 0.25  # augmentation as `fsdeploy pretrain`: random resized crop keeps 75-100% of the area
    aug_rotation: float = 10.0  # and a rotation up to +- this many degrees (no flips: glyphs)
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    fp16: bool = False

    def as_command(self) -> str:
        parts = ["fsdeploy", "distill", "--teacher", self.teacher, "--student", self.student, "--data", str(self.data),
                 "--out", str(self.out), "--method", self.method, "--split", self.split, "--epochs", str(self.epochs),
                 "--batch", str(self.batch_size), "--lr", f"{self.lr:g}", "--beta", f"{self.beta:g}",
                 "--meta-lr", f"{self.meta_lr:g}", "--inner-steps", str(self.inner_steps), "--pairs", self.pairs,
                 "--aug-scale", f"{self.aug_scale:g}", "--aug-rotation", f"{self.aug_rotation:g}", "--seed", str(self.seed)]
        parts += [] if self.img_size is None else ["--img-size", str(self.img_size)]
        parts += [] if self.student_checkpoint is None else ["--student-checkpoint", str(self.student_checkpoint)]
        parts += [] if self.max_steps is None else ["--max-steps", str(self.max_steps)]
        return shlex.join(parts)


@dataclass(frozen=True)
class StepStats:
    step: int
    epoch: int
    ce: float
    matching: float
    meta_ce: float  # L_ce(θ_{T+1}) of the lookahead (nan without meta-networks)
    accuracy: float  # on the training batch


@dataclass(frozen=True)
class DistillResult:
    checkpoint: Path
    history: tuple[StepStats, ...]
    classes: int
    images: int
    pairs: tuple[tuple[int, int], ...]
    pair_weights: tuple[float, ...]  # mean λ per pair at the end (1.0 for uniform)
    seconds: float


def load_teacher(spec: str, img_size: int | None = None) -> tuple[Any, Preprocess, str]:
    """A teacher from a checkpoint file (model name from its metadata) or a timm name.

    A name is the shipped glyph checkpoint when fsdeploy ships one for it, else timm's pretrained weights
    (network needed). Returns (model in eval mode, its preprocessing, timm name).
    """
    path = Path(spec)
    if path.suffix in (".safetensors", ".pth", ".pt") or path.exists():
        _, meta = read_checkpoint(path)
        name = meta.get("model")
        if not name:
            raise InvalidInput(f"--teacher {spec} has no fsdeploy metadata naming its model; save it with fsdeploy "
                               "(fsdeploy pretrain / distill) or pass a timm name")
        model, pre = create_backbone(name, checkpoint=path, img_size=img_size)
        return model, pre, name
    from fsdeploy.weights import shipped, shipped_checkpoint

    if shipped(spec) is not None:
        model, pre = create_backbone(spec, checkpoint=shipped_checkpoint(spec), img_size=img_size)
    else:
        model, pre = create_backbone(spec, pretrained=True, img_size=img_size)
    return model, pre, spec


def load_labelled(data: Path, split: str, img_size: int) -> tuple[Any, Any, tuple[str, ...]]:
    """uint8 RGB (N, 3, S, S) and labels from a glyph corpus split (splits.json) or any ImageFolder."""
    torch = require("torch")
    from PIL import Image

    from fsdeploy.data.folders import scan_image_folder

    classes = None
    if (Path(data) / "splits.json").is_file():
        from fsdeploy.data.glyphs import load_splits

        classes = list(load_splits(data).split(split))
    files = scan_image_folder(data, classes=classes)
    pixels = np.empty((len(files), 3, img_size, img_size), dtype=np.uint8)
    for i, p in enumerate(files.paths):
        with Image.open(p) as img:
            rgb = img.convert("RGB").resize((img_size, img_size), Image.Resampling.BILINEAR)
        pixels[i] = np.asarray(rgb).transpose(2, 0, 1)
    return torch.from_numpy(pixels), torch.from_numpy(files.labels.astype(np.int64)), tuple(files.classes)


class _Student(torch.nn.Module):
    """Student network (+ temporary classifier) and its matching transforms; forward gives logits and L_wfm."""

    def __init__(self, net: Any, taps_names: list[str], transforms: Any, pairs: list[tuple[int, int]]) -> None:
        super().__init__()
        from fsdeploy.train.l2tww import FeatureTaps

        self.net = net
        self.r = transforms
        self.pairs = pairs
        self._taps = FeatureTaps(net, taps_names)

    def forward(self, x: Any, teacher_feats: Any = None, cw: Any = None, pw: Any = None, beta: float = 0.5) -> Any:
        from fsdeploy.train.l2tww import matching_loss

        logits = self.net(x)
        if teacher_feats is None or not self.pairs:
            return logits, logits.new_zeros(())
        return logits, matching_loss(teacher_feats, self._taps.features(), self.r, self.pairs,
                                     channel_weights=cw, pair_weights=pw, beta=beta)


def distill(cfg: DistillConfig, *, on_step: Callable[[StepStats, int], None] | None = None) -> DistillResult:
    """Train `cfg.student` on the labelled data with the chosen method; write the headless student to `cfg.out`.

    Raises:
        InvalidInput: a bad option, unreadable data or teacher, or an unknown method.
    """
    torch = require("torch")
    if cfg.method not in METHODS:
        raise InvalidInput(f"--method {cfg.method!r} is not one of {', '.join(METHODS)}")
    if cfg.out.suffix != ".safetensors":
        raise InvalidInput(f"--out {cfg.out} must end in .safetensors")
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.inner_steps < 1:
        raise InvalidInput(f"need epochs >= 1, batch size >= 2, inner steps >= 1; got {cfg.epochs}, {cfg.batch_size}, {cfg.inner_steps}")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):  # seeding stays inside the run
            torch.manual_seed(cfg.seed)
            return _run(cfg, on_step)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DistillConfig, on_step: Callable[[StepStats, int], None] | None = None) -> DistillResult:
    torch = require("torch")
    import timm

    from fsdeploy.backbones import SIZED_AT_BUILD, family_of
    from fsdeploy.train import l2tww

    start = time.perf_counter()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher, pre, teacher_name = load_teacher(cfg.teacher, cfg.img_size)
    size = pre.input_size[-1]
    x_all, y_all, classes = load_labelled(cfg.data, cfg.split, size)
    if len(classes) < 2:
        raise InvalidInput(f"{cfg.data} has {len(classes)} class; distillation needs a labelled target task")
    if not timm.models.is_model(cfg.student):
        raise InvalidInput(f"--student {cfg.student!r} is not a timm model; try mobilenetv3_small_050 or resnet10t")
    if cfg.student_checkpoint is not None:
        net, _ = create_backbone(cfg.student, checkpoint=cfg.student_checkpoint, img_size=size)
    else:
        net = timm.create_model(cfg.student, num_classes=0, **({"img_size": size} if family_of(cfg.student) in SIZED_AT_BUILD else {}))
    net.reset_classifier(len(classes))
    l2tww.twice_differentiable_(net)
    t_names, s_names = l2tww.tap_layers(teacher), l2tww.tap_layers(net)
    t_ch, s_ch = l2tww.channels_of(teacher, t_names, size), l2tww.channels_of(net, s_names, size)
    pairs = [] if cfg.method == "finetune" else l2tww.parse_pairs(cfg.pairs, len(t_names), len(s_names))
    student = _Student(net, s_names, l2tww.MatchingTransforms(t_ch, s_ch, pairs), pairs).to(device).train()
    for p in student.parameters():
        p.requires_grad_(True)
    teacher = teacher.to(device).eval()
    t_taps = l2tww.FeatureTaps(teacher, t_names)
    meta = cfg.method == "l2t-ww"
    what = l2tww.ChannelWeights(t_ch, pairs).to(device)
    where = l2tww.PairWeights(t_ch, pairs, init=cfg.pair_init).to(device)
    meta_params = list(what.parameters()) + list(where.parameters())
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    meta_opt = torch.optim.Adam(meta_params, lr=cfg.meta_lr, weight_decay=cfg.meta_weight_decay) if meta else None
    steps_per_epoch = max(1, len(x_all) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    # the official code steps CosineAnnealingLR(T_max=epochs) once per epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    names = [k for k, _ in student.named_parameters()]
    history: list[StepStats] = []
    step = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    aug = _Aug(cfg.aug_scale, cfg.aug_rotation)
    try:
        for epoch in range(1, cfg.epochs + 1):
            order = torch.randperm(len(x_all), generator=gen)
            for b in range(steps_per_epoch):
                if step >= total:
                    break
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                # teacher and student see the same augmented view (pretrain's one affine warp, in [0, 1])
                x = (_augment(x_all[idx].to(device), aug, gen) - mean) / std
                y = y_all[idx].to(device)
                with torch.no_grad():
                    teacher(x)
                    t_feats = [f.detach() for f in t_taps.features()]
                cw, pw = (what(t_feats), where(t_feats)) if meta else (None, None)
                # the real step: CE + β·L_wfm at the current meta weights (constants for θ)
                logits, match = student(x, t_feats if pairs else None,
                                        None if cw is None else [w.detach() for w in cw],
                                        None if pw is None else [w.detach() for w in pw], cfg.beta)
                ce = torch.nn.functional.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                (ce + match).backward()
                opt.step()
                meta_ce = math.nan
                if meta:
                    meta_ce = _meta_step(student, names, opt, meta_opt, what, where, meta_params, x, y, t_feats, cfg)
                stats = StepStats(step + 1, epoch, ce.item(), match.item(), meta_ce,
                                  float((logits.argmax(1) == y).float().mean()))
                history.append(stats)
                if on_step is not None:
                    on_step(stats, total)
                step += 1
            sched.step()
            if step >= total:
                break
        with torch.no_grad():
            teacher(((x_all[: cfg.batch_size].to(device).float() / 255.0) - mean) / std)
            final_pw = where(t_taps.features()) if meta else [torch.ones(1)] * len(pairs)
            lam = tuple(float(w.mean()) for w in final_pw)
    finally:
        t_taps.close()
        student._taps.close()
    net.reset_classifier(0)  # the checkpoint is a backbone
    extra = {
        "train_command": cfg.as_command(),
        "distill": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "teacher": teacher_name,
        "pairs": [list(p) for p in pairs],
        "pair_weights": list(lam),
        "classes": len(classes),
    }
    save_checkpoint(net.cpu(), cfg.out, name=cfg.student, preprocess=pre, fp16=cfg.fp16, extra=extra)
    return DistillResult(cfg.out, tuple(history), len(classes), len(x_all), tuple(pairs), lam, time.perf_counter() - start)


@dataclass(frozen=True)
class _Aug:
    """The two fields fsdeploy.train.pretrain's augmentation reads."""

    max_scale_loss: float
    max_rotation_deg: float


def _meta_step(student: Any, names: list[str], opt: Any, meta_opt: Any, what: Any, where: Any, meta_params: list[Any],
               x: Any, y: Any, t_feats: list[Any], cfg: DistillConfig) -> float:
    """One meta update of the channel and pair networks by the lookahead gradient (the real θ is untouched)."""
    torch = require("torch")
    from fsdeploy.train.l2tww import functional, meta_gradient

    params = {k: p.detach().clone().requires_grad_(True) for k, p in student.named_parameters()}
    state = {k: opt.state[p]["momentum_buffer"].detach() for k, p in student.named_parameters()
             if p in opt.state and opt.state[p].get("momentum_buffer") is not None}
    lr = opt.param_groups[0]["lr"]
    with functional(student) as call:
        cw, pw = what(t_feats), where(t_feats)

        def matching(theta: Any) -> Any:
            return call(theta, x, t_feats, cw, pw, cfg.beta)[1]

        def target(theta: Any) -> Any:
            return torch.nn.functional.cross_entropy(call(theta, x)[0], y)

        outer, grads = meta_gradient(params, meta_params, matching, target, steps=cfg.inner_steps, lr=lr,
                                     momentum=cfg.momentum, weight_decay=cfg.weight_decay, buffers=state)
    meta_opt.zero_grad(set_to_none=True)
    for p, g in zip(meta_params, grads):
        p.grad = g
    meta_opt.step()
    return float(outer)
