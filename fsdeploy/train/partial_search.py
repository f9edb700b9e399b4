"""Which layers to fine-tune, and how fast: the evolutionary search of Shen et al. for partial fine-tuning.

Shen, Liu, Qin, Savvides, Cheng, "Partial Is Better Than All: Revisiting Fine-tuning Strategy for Few-shot
Learning", AAAI 2021 (arXiv 2102.03983). A fine-tuning strategy is a genome with one gene per layer unit:
that unit's learning-rate multiplier, 0 meaning frozen. Each candidate is scored by fine-tuning on the
support sets of validation tasks drawn from base/validation classes (never the novel classes) and
measuring query accuracy; an evolutionary search (random initial population, keep the top k, children by
mutation and crossover of the top k, repeat) keeps the best strategy. At adapt time `partial-ft` fine-tunes
with that strategy (`fsdeploy.adapters.partial_ft`), here on Chen et al.'s fine-tuning loop with a new
linear head (`fsdeploy.train.finetune`, recipe `chen`; the unit's rate is multiplier x 0.01, the head
always at 0.01).

Which settings are the paper's and which are ours. Checked against: the paper's abstract (arXiv 2102.03983:
freeze or fine-tune particular layers, each fine-tuned layer at its own learning rate, the layers and their
rates found by an evolutionary search; experiments on CUB and mini-ImageNet). Its Section 4 (the search's
numbers) could not be read here (only the abstract pages are in the reachable corpora), and no official code
for it was found (code index searched for the title, authors and "partial fine-tuning evolutionary search").
So every number below is ours; none is claimed as the paper's:

- the search loop and its budget are those of the official single-path one-shot (SPOS) evolutionary
  searcher (Guo et al., ECCV 2020; megvii-model/SinglePathOneShot `src/Search/search.py:240-245` at
  36eed6c): population 50, top k = 10 kept, 25 children by mutation (each gene redrawn with probability
  0.1, `:147-171`), 25 by uniform crossover of two top-k parents (`:173-194`), the rest of the population
  random (`:230`), 20 iterations. Reason: it is the evolutionary searcher of this kind (genomes of discrete
  choices, top-k selection, mutation and crossover) whose settings we could read;
- the candidate learning-rate multipliers (`MULTIPLIERS`): 0 (frozen), 0.01, 0.1, 1, times Chen et al.'s
  base rate 0.01. Reason: frozen to the full rate on a log scale with four choices, so the space is 4^units;
- the layers searched (`units_of`, below): one gene per block, not per tensor. Reason: 10-25 genes for
  resnet18 (10) or efficientnet_b0 (20) keep the genome short enough for about 50 x 20 evaluations to make
  progress;
- the validation tasks (`sample_tasks`, `main`): 10 tasks, 5-way 1-shot, 15 queries each, from the corpus's
  val split (base classes if chosen; never novel). Reason: each fitness evaluation fine-tunes every task for
  `epochs` (100, the deployed recipe's, so the search scores what `partial-ft` runs), which bounds the budget on
  a CPU; the fitness is their mean query accuracy.
`SearchSettings.small()` is a tiny budget for tests.

Layer units (`units_of`): the model's top-level children, with block sequences (nn.Sequential/ModuleList of
2 or more) split into their blocks, recursively (resnet: conv1, bn1, layer1.0 ... layer4.1; efficientnet:
conv_stem, bn1, blocks.0, blocks.1.0, ...), plus any parameter held by the root itself (a ViT's cls_token).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fsdeploy.atomic import write_text
from fsdeploy.errors import FsdeployError, InvalidInput
from fsdeploy.train.finetune import CHEN_EPOCHS, fit_finetune

MULTIPLIERS = (0.0, 0.01, 0.1, 1.0)
SPEC_FORMAT = "fsdeploy-partial-ft"
SPEC_VERSION = 1


@dataclass(frozen=True)
class SearchSettings:
    """Evolutionary search budget (module docstring); `epochs`: fine-tuning epochs per validation task."""

    population: int = 50
    select: int = 10
    mutation: int = 25
    crossover: int = 25
    mutation_prob: float = 0.1
    iterations: int = 20
    choices: tuple[float, ...] = MULTIPLIERS
    epochs: int = CHEN_EPOCHS
    seed: int = 0

    @classmethod
    def small(cls, **kw: Any) -> SearchSettings:
        """A tiny budget (tests, smoke runs): population 4, top 2, 2 + 2 children, 2 iterations, 2 epochs."""
        return cls(**{"population": 4, "select": 2, "mutation": 2, "crossover": 2, "iterations": 2, "epochs": 2, **kw})

    def __post_init__(self) -> None:
        if min(self.population, self.select, self.iterations) < 1 or self.mutation < 0 or self.crossover < 0:
            raise InvalidInput(f"partial-ft search needs population, select, iterations >= 1; got {self}")
        if self.select > self.population or self.mutation + self.crossover > self.population:
            raise InvalidInput("partial-ft search: select and mutation + crossover must not exceed the population")
        if not self.choices or any(c < 0 for c in self.choices):
            raise InvalidInput(f"partial-ft multipliers must be >= 0, got {self.choices}")


@dataclass(frozen=True)
class ValTask:
    """One validation task: preprocessed support/query images (N, C, H, W) and their labels."""

    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray


@dataclass(frozen=True)
class PartialSpec:
    """A searched fine-tuning strategy: learning-rate multiplier per layer unit (0 = frozen).

    Attributes:
        units: unit names (`units_of` of the backbone it was searched on).
        multipliers: one per unit.
        fitness: mean validation query accuracy (percent) of this strategy.
        model: the timm model name it was searched for ("" when unknown).
        search: the settings and what the search evaluated (for the record).
    """

    units: tuple[str, ...]
    multipliers: tuple[float, ...]
    fitness: float = float("nan")
    model: str = ""
    search: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """unit -> multiplier, as `fit_finetune(multipliers=...)` takes it."""
        return dict(zip(self.units, self.multipliers))

    def trained_units(self) -> list[str]:
        return [u for u, m in zip(self.units, self.multipliers) if m > 0]

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON (atomically)."""
        body = {"format": SPEC_FORMAT, "version": SPEC_VERSION, "model": self.model, "fitness": self.fitness,
                "units": list(self.units), "multipliers": list(self.multipliers), "search": self.search}
        write_text(path, json.dumps(body, indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> PartialSpec:
        """Read a spec written by `save`.

        Raises:
            InvalidInput: missing, unreadable or not a partial-ft spec.
        """
        path = Path(path)
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"--spec {path}: cannot read a partial-ft spec ({exc}); write one with "
                               "`python -m fsdeploy.train.partial_search`") from None
        if not isinstance(body, dict) or body.get("format") != SPEC_FORMAT or body.get("version") != SPEC_VERSION:
            raise InvalidInput(f"--spec {path} is not a version-{SPEC_VERSION} partial-ft spec; re-run the search")
        units, mults = tuple(body.get("units", ())), tuple(float(m) for m in body.get("multipliers", ()))
        if len(units) != len(mults) or not units:
            raise InvalidInput(f"--spec {path}: units and multipliers differ in length or are empty; re-run the search")
        return cls(units, mults, float(body.get("fitness", float("nan"))), str(body.get("model", "")), dict(body.get("search", {})))

    def check_backbone(self, backbone: nn.Module, where: str = "--spec") -> None:
        """Refuse a spec searched on another architecture (its units are not this backbone's).

        Raises:
            InvalidInput: the unit names differ.
        """
        mine = tuple(units_of(backbone))
        if mine != self.units:
            missing = sorted(set(self.units) - set(mine))[:3]
            raise InvalidInput(f"{where} was searched on another backbone ({self.model or 'unknown'}): units like "
                               f"{', '.join(missing) or '(order differs)'} are not this one's; re-run the search on this bundle")


def units_of(model: nn.Module) -> list[str]:
    """Layer units of `model`, shallow first (module docstring)."""
    units: list[str] = [n for n, _ in model.named_parameters(recurse=False)]

    def visit(name: str, module: nn.Module) -> None:
        if not any(True for _ in module.parameters()):
            return
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) >= 2:
            for child_name, child in module.named_children():
                visit(f"{name}.{child_name}", child)
        else:
            units.append(name)

    for child_name, child in model.named_children():
        visit(child_name, child)
    return units


def task_accuracy(backbone: nn.Module, task: ValTask, multipliers: dict[str, float], epochs: int, seed: int = 0,
                  device: str | None = None) -> float:
    """Query accuracy (percent) after fine-tuning with `multipliers` on the task's support set (chen recipe)."""
    res = fit_finetune(backbone, task.support, task.support_labels, steps=epochs, recipe="chen", multipliers=multipliers,
                       seed=seed, device=device)
    with torch.no_grad():
        pred = res.logits(res.model(torch.as_tensor(task.query, dtype=torch.float32))).argmax(1).numpy()
    classes = np.unique(task.support_labels)  # fit_finetune maps labels to 0..K-1 in sorted order
    return float(np.mean(classes[pred] == np.asarray(task.query_labels)) * 100.0)


Genome = tuple[float, ...]


def search(backbone: nn.Module, tasks: Sequence[ValTask], settings: SearchSettings = SearchSettings(), *,
           model: str = "", fitness: Callable[[Genome], float] | None = None,
           progress: Callable[[int, float], None] | None = None, device: str | None = None) -> PartialSpec:
    """Evolutionary search for the fine-tuning strategy with the best mean validation accuracy.

    Args:
        tasks: validation tasks (from base/validation classes).
        fitness: overrides the score of a genome (tests); default: mean `task_accuracy` over `tasks`.
        progress: called with (iteration, best fitness so far) after each iteration.

    Raises:
        InvalidInput: no tasks (and no `fitness`), or bad settings.
    """
    units = units_of(backbone)
    if not units:
        raise InvalidInput(f"{type(backbone).__name__} has no parameters to fine-tune")
    if fitness is None and not tasks:
        raise InvalidInput("the partial-ft search needs at least one validation task")
    s = settings
    rng = np.random.default_rng(s.seed)
    choices = np.asarray(s.choices, dtype=float)

    def score(g: Genome) -> float:
        if fitness is not None:
            return float(fitness(g))
        mults = dict(zip(units, g))
        return float(np.mean([task_accuracy(backbone, t, mults, s.epochs, seed=s.seed + i, device=device)
                              for i, t in enumerate(tasks)]))

    seen: dict[Genome, float] = {}

    def add(g: Genome) -> None:
        if g not in seen:
            seen[g] = score(g)

    def random_genome() -> Genome:
        return tuple(float(v) for v in rng.choice(choices, size=len(units)))

    def fill(count: int, make: Callable[[], Genome], fresh: set[Genome]) -> None:
        tries = 0
        while count > 0 and tries < 50 * max(count, 1):
            tries += 1
            g = make()
            if g not in seen and g not in fresh:
                fresh.add(g)
                count -= 1

    t0 = time.perf_counter()
    start: set[Genome] = set()
    fill(s.population, random_genome, start)
    for g in sorted(start):
        add(g)
    history = []
    for it in range(s.iterations):
        top = sorted(seen, key=lambda g: (-seen[g], g))[: s.select]
        history.append(seen[top[0]])
        if progress:
            progress(it, seen[top[0]])
        if it == s.iterations - 1:
            break

        def mutate() -> Genome:
            parent = top[int(rng.integers(len(top)))]
            redraw = rng.random(len(units)) < s.mutation_prob
            return tuple(float(rng.choice(choices)) if r else v for v, r in zip(parent, redraw))

        def cross() -> Genome:
            a, b = top[int(rng.integers(len(top)))], top[int(rng.integers(len(top)))]
            pick = rng.random(len(units)) < 0.5
            return tuple(x if p else y for x, y, p in zip(a, b, pick))

        fresh: set[Genome] = set()
        fill(s.mutation, mutate, fresh)
        fill(s.crossover, cross, fresh)
        fill(s.population - len(fresh), random_genome, fresh)
        for g in sorted(fresh):
            add(g)
    best = min(seen, key=lambda g: (-seen[g], g))
    record = {**asdict(s), "choices": list(s.choices), "evaluated": len(seen), "tasks": len(tasks),
              "best_per_iteration": history, "seconds": round(time.perf_counter() - t0, 1)}
    return PartialSpec(tuple(units), best, seen[best], model, record)


def sample_tasks(folder: str | Path, preprocess: Any, *, split: str = "val", n_tasks: int = 10, ways: int = 5,
                 shots: int = 1, queries: int = 15, seed: int = 0) -> list[ValTask]:
    """Validation tasks drawn from `split` classes of an ImageFolder (`splits.json`: val or base; never novel).

    Raises:
        InvalidInput: `split` is novel, or the folder lacks it.
    """
    from fsdeploy.data.cache import ImageCache
    from fsdeploy.data.episodes import sample_episode
    from fsdeploy.data.folders import scan_image_folder, split_classes

    if split == "novel":
        raise InvalidInput("--split novel: the partial-ft search must not see the novel classes; use val or base")
    files = scan_image_folder(folder, classes=split_classes(folder, split))
    sizes = np.bincount(np.asarray(files.labels))
    fits = int((sizes >= shots + queries).sum())
    if fits < ways:  # say which numbers fit this split, before any image is read
        most = int(np.sort(sizes)[-ways]) if sizes.size >= ways else 0
        raise InvalidInput(
            f"--split {split} of {folder}: {ways}-way {shots}-shot tasks with {queries} queries need {ways} classes with "
            f">= {shots + queries} images, and {fits} have that many; pass --queries {max(1, most - shots)} or fewer"
            + ("" if most > shots else " (or fewer --shots)"))
    rng = np.random.default_rng(seed)
    images = ImageCache(files.paths, preprocess)
    out = []
    for _ in range(n_tasks):
        ep = sample_episode(files.labels, ways, shots, queries, rng)
        out.append(ValTask(images.get(ep.support), np.asarray(ep.support_labels), images.get(ep.query), np.asarray(ep.query_labels)))
    return out


def search_bundle(bundle_dir: str | Path, data: str | Path, out: str | Path, *, split: str = "val",
                  settings: SearchSettings = SearchSettings(), n_tasks: int = 10, ways: int = 5, shots: int = 1,
                  queries: int = 15, device: str | None = None,
                  progress: Callable[[int, float], None] | None = None) -> PartialSpec:
    """Search on a bundle's own backbone (as `fsdeploy adapt` rebuilds it) and write the spec to `out`."""
    from fsdeploy.bundle import load_bundle
    from fsdeploy.runtime.open import torch_graphs

    bundle = load_bundle(bundle_dir)
    backbone = torch_graphs(bundle)["features"].module
    tasks = sample_tasks(data, bundle.manifest.preprocess, split=split, n_tasks=n_tasks, ways=ways, shots=shots,
                         queries=queries, seed=settings.seed)
    spec = search(backbone, tasks, settings, model=bundle.manifest.model, progress=progress, device=device)
    spec.search.update({"split": split, "ways": ways, "shots": shots, "queries": queries, "data": str(data)})
    spec.save(out)
    return spec


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m fsdeploy.train.partial_search BUNDLE DATA --out spec.json [--small]`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fsdeploy.train.partial_search", description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("data", help="ImageFolder with splits.json (a glyph corpus); tasks come from --split")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--small", action="store_true", help="tiny search budget (smoke runs)")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    base = SearchSettings.small() if a.small else SearchSettings()
    over = {k: v for k, v in {"iterations": a.iterations, "epochs": a.epochs, "seed": a.seed}.items() if v is not None}
    try:
        settings = SearchSettings(**{**asdict(base), **over})
        spec = search_bundle(a.bundle, a.data, a.out, split=a.split, settings=settings, n_tasks=a.tasks, ways=a.ways,
                             shots=a.shots, queries=a.queries, device=a.device,
                             progress=lambda it, best: print(f"iteration {it}: best {best:.2f}%", flush=True))
    except FsdeployError as exc:  # one line, as the fsdeploy CLI prints it
        p.exit(1, f"error: {exc}\n")
    print(f"wrote {a.out}: fitness {spec.fitness:.2f}%, trains {', '.join(spec.trained_units()) or 'the head only'}")


if __name__ == "__main__":
    main()
