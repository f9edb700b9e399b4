"""Per-method cost of adapting to one few-shot task: MACs to adapt, MACs per query, numbers adapted.

Reproduces the comparison of UpperCaSE (Patacchiola et al., "Contextual Squeeze-and-Excitation for
Efficient Few-Shot Image Classification", NeurIPS 2022, Fig. 1): fine-tuners pay forward+backward passes
over many steps, meta-learners one forward pass over the support set, UpperCaSE sits between.

Every number is combined from counts, never from constants: per-image MACs of the actual graphs
(`fsdeploy.bench.macs`, gathered in `CountedMacs`, e.g. by `measure_backbone`) and the numpy heads' own
exact `fit_macs` / `predict_macs` / `n_params`. With n support images, K ways, feature size D, forward
MACs F and backward MACs G per image of the trained graph (convention in `fsdeploy.bench.macs`):

- head methods (NCC/ProtoNet, SimpleShot, linear head, baseline, baseline++, LT+NCC, linear-Newton):
  adapt = n F + T(n) + head.fit_macs(n, D, K); query = F + T(1) + head.predict_macs(1, D, K), where
  T(r) is the method's feature transform (SimpleShot: CL2N) on r rows, 0 without one.
- TOAST: the same on TOAST features; its top-down modules are tuned once per dataset, not per task,
  so only inference cost enters.
- CaSE + linear (UpperCaSE): adapt = n F_case (context pass on the support set) + CaSE MLP MACs (once per
  task) + linear.fit_macs(n, D, K); query = F_case + linear.predict_macs(1, D, K).
- fine-tuning recipes (BN-affine), S steps of batch B (B images per step,
  drawn with replacement; None = the whole support set) with a linear classifier trained jointly:
  adapt = S (B (F + G) + 3 linear.predict_macs(B, D, K)), the classifier paying its forward, its weight
  grad and its input grad. query = F + linear.predict_macs(1, D, K).
- full and partial fine-tuning (`full-ft`, `partial-ft`, formula of `fsdeploy.adapters.full_ft`): S epochs,
  each passing every support image once (batches of B): adapt = S (n (F + G) + 3 linear.predict_macs(n, D, K)),
  G the backward of the trained set (partial: the last block and everything after it).
  MAML (`maml-10`, `maml-100`, kind `maml`) counts the inner loop only (no second-order terms: the outer
  loop is meta-training), the whole support set per step: the full-ft formula with S steps.
- TSA (alpha + beta): S steps on the whole support set with the NCC loss, then one pass to build the final
  prototypes: adapt = S (n (F + G) + 3 L) + n F + ncc.fit_macs(n, D, K), L = ncc.fit_macs(n, D, K) +
  ncc.predict_macs(n, D, K) (the loss head's forward; its backward is counted as 2x forward).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from fsdeploy.modules.ett import EttCounts

from fsdeploy.bench.macs import (
    Trainable,
    count_backward_macs,
    count_macs,
    count_params,
    last_block,
    norm_affine_params,
    params_from,
)
from fsdeploy.errors import InvalidInput
from fsdeploy.registry import Registry


class CountingHead(Protocol):
    """The part of fsdeploy.heads.Head the cost model reads."""

    def fit_macs(self, n_support: int, dim: int, n_classes: int) -> int: ...
    def predict_macs(self, n_query: int, dim: int, n_classes: int) -> int: ...
    def n_params(self, dim: int, n_classes: int) -> int: ...


HeadFactory = Callable[..., CountingHead]
# (transform name, rows, dim) -> MACs of applying a feature transform (e.g. SimpleShot's CL2N) to `rows` features
TransformMacs = Callable[[str, int, int], int]
# (transform name, dim) -> numbers the transform fits per task (CL2N centred on the support mean: dim)
TransformParams = Callable[[str, int], int]


@dataclass(frozen=True)
class TaskShape:
    """One task's size: `ways` classes and `n_support` labelled images in all."""

    ways: int
    n_support: int
    name: str = ""

    @classmethod
    def from_shots(cls, ways: int, shots: int) -> TaskShape:
        return cls(ways, ways * shots, f"{ways}-way {shots}-shot")

    def __post_init__(self) -> None:
        if self.ways < 2 or self.n_support < self.ways:
            raise InvalidInput(
                f"a task needs >= 2 ways and >= 1 support image per way, got {self.ways} ways, "
                f"{self.n_support} support images"
            )


TASK_PRESETS: dict[str, TaskShape] = {
    "5w1s": TaskShape.from_shots(5, 1),
    "5w5s": TaskShape.from_shots(5, 5),
    # Meta-Dataset episodes reach 50 ways and 500 support images (Triantafillou et al., ICLR 2020)
    "md-max": TaskShape(50, 500, "Meta-Dataset max (50-way, 500 support)"),
}


@dataclass(frozen=True)
class TrainedGraph:
    """Per-image MACs of a graph whose parameters train per task.

    Attributes:
        forward: forward MACs per image.
        backward: backward MACs per image for the trained parameter set (macs.py convention).
        params: numbers trained per task, the classifier excluded.
    """

    forward: int
    backward: int
    params: int


@dataclass(frozen=True)
class CaseCounts:
    """CaSE backbone counts: `forward` MACs per image, `mlp` MACs once per task, `gamma` scales per task."""

    forward: int
    mlp: int
    gamma: int


@dataclass(frozen=True)
class CountedMacs:
    """Everything counted about one backbone and its adaptation modules; None where not measured."""

    dim: int
    backbone: int
    full: TrainedGraph | None = None
    partial: TrainedGraph | None = None
    bn_affine: TrainedGraph | None = None
    tsa: TrainedGraph | None = None
    case: CaseCounts | None = None
    toast: int | None = None
    ett: EttCounts | None = None  # eTT's prefix ViT, per prefix token where the ways matter (ViT bundles)


ADAPTER_FIELDS = ("case", "toast", "tsa", "ett")  # CountedMacs fields an adapter kind's counter fills
TRANSFORM_KINDS = ("head", "toast", "case")  # method kinds whose features a transform may precede


@dataclass(frozen=True)
class Method:
    """One row of the cost table: how the method adapts and with which head.

    `kind` picks the formula (module docstring): 'head', 'toast', 'case', 'finetune', 'tsa'.
    `transform` is a feature transform applied before the head (support and queries), as in
    fsdeploy.runtime.task ('none', 'l2', 'cl2n', ...); its MACs come from the `transform_macs` callable.
    `graph` names the CountedMacs field a finetune row trains ('full', 'partial', 'bn_affine').
    """

    key: str
    label: str
    kind: str
    head: str = "linear"
    head_opts: dict[str, Any] = field(default_factory=dict)
    transform: str = "none"
    steps: int | None = None
    batch: int | None = None
    graph: str = ""
    note: str = ""


DEFAULT_METHODS: tuple[Method, ...] = (
    Method("ncc", "NCC / ProtoNet", "head", "ncc"),
    Method("simpleshot", "SimpleShot (CL2N + NCC)", "head", "ncc", transform="cl2n",
           note="centred on the bundle's base-class mean"),
    Method("ci", "Channel importance (ci + cosine NCC)", "head", "ncc", {"distance": "cosine"}, transform="ci"),
    Method("linear", "Linear head (UpperCaSE recipe)", "head", "linear"),
    Method("linear-newton", "Linear head (Newton)", "head", "linear-newton"),
    Method("baseline", "Baseline", "head", "baseline"),
    Method("baseline++", "Baseline++", "head", "baseline++"),
    Method("lt-ncc", "LT + NCC", "head", "lt-ncc"),
    Method("bd-cspn", "BD-CSPN (prototype rectification)", "head", "bd-cspn",
           note="transductive: rectified per query batch, query MACs for a batch of one"),
    Method("case-linear", "CaSE + linear (UpperCaSE)", "case", "linear"),
    Method("toast", "TOAST + linear", "toast", "linear", note="top-down tuning is per dataset: not counted"),
    Method("tsa", "TSA (alpha+beta)", "tsa", "ncc", steps=40,
           note="recipe of Li et al., CVPR 2022, unseen-domain rates alpha 0.5 / beta 1.0"),
    Method("tsa-seen", "TSA (alpha+beta), seen-domain rates", "tsa", "ncc", steps=40,
           note="alpha 0.05 / beta 0.1, for images like the backbone's training data"),
    Method("ett", "eTT (attentive prefixes + DRA)", "ett", "ncc", steps=40,
           note="Xu et al., TMLR 2023: prefixes from attentive prototypes, lr 1e-3; ViT only"),
    Method("bn-affine", "BN-affine", "finetune", steps=40, graph="bn_affine"),
    Method("bn-affine-olor", "BN-affine (OLOR)", "finetune", steps=40, graph="bn_affine",
           note="Adam + OLOR rollback to the pretrained BN weights"),
    Method("partial-ft", "Partial fine-tuning (last block + head)", "partial-ft", steps=100, batch=4, graph="partial",
           note="Chen et al.'s loop; counted for the last block, a searched spec's own count is in the task's info"),
    Method("full-ft", "Full fine-tuning", "full-ft", steps=100, batch=4, graph="full",
           note="Chen et al. ICLR 2019 baseline fine-tuning loop on backbone + head: SGD lr 0.01"),
    Method("full-ft-olor", "Full fine-tuning (OLOR)", "full-ft", steps=100, batch=4, graph="full",
           note="OLOR on the backbone: Adam lr 1e-4 cosine + rollback to the pretrained weights"),
    Method("maml-10", "MAML inner loop (10 steps)", "maml", steps=10, graph="full",
           note="inner loop only, SGD lr 0.01 from the pretrained backbone and a zero head; no meta-trained init"),
    Method("maml-100", "MAML inner loop (100 steps)", "maml", steps=100, graph="full",
           note="inner loop only, SGD lr 0.01 from the pretrained backbone and a zero head; no meta-trained init"),
)

BACKWARD_TEXT = {
    "head": "none",
    "toast": "none",
    "case": "none",
    "tsa": "frozen backbone: input grads + adapter weight grads",
    "full": "all weights: input + weight grads",
    "partial": "last block + head: input + weight grads from the block on",
    "bn_affine": "frozen convs: input grads + norm affine grads",
}


@dataclass(frozen=True)
class CostRow:
    """One method's adaptation cost for one task shape (plain values: renders to tables, CSV and JSON)."""

    method: str
    label: str
    setting: str
    ways: int
    n_support: int
    recipe: str
    steps: int | None
    batch: int | None
    backward: str
    adapt_macs: int
    query_macs: int
    params_adapted: int
    head_macs: int = 0  # the part of adapt_macs spent outside the backbone graphs: transform + head (or loss/classifier)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default_factory() -> HeadFactory:
    from fsdeploy.heads import make_head  # the registry fills when the package imports its heads

    return make_head


def missing_counts(
    counts: CountedMacs, methods: Sequence[Method] = DEFAULT_METHODS, *, transform_macs: TransformMacs | None = None
) -> dict[str, str]:
    """Methods that cannot be costed from `counts` (and `transform_macs`), with what each one lacks."""
    out = {}
    for m in methods:
        # a fine-tuning row trains `m.graph`; an adapter kind's own row (case, toast, tsa) reads its kind's field
        fld = m.graph or (m.kind if m.kind in ADAPTER_FIELDS else None)
        if fld and getattr(counts, fld) is None:
            out[m.key] = f"CountedMacs.{fld} not measured"
        elif m.transform != "none" and transform_macs is None:
            out[m.key] = f"no transform_macs given for transform {m.transform!r}"
    return out


def adaptation_costs(
    counts: CountedMacs,
    task: TaskShape,
    methods: Sequence[Method] = DEFAULT_METHODS,
    *,
    make_head: HeadFactory | None = None,
    transform_macs: TransformMacs | None = None,
    transform_params: TransformParams | None = None,
) -> list[CostRow]:
    """Cost rows for every method in `methods` whose counts are present (see `missing_counts`).

    Args:
        counts: per-image MACs of the graphs involved, counted on the actual models.
        task: ways and support size.
        methods: the table's rows; defaults to every method fsdeploy supports.
        make_head: head factory (name, **opts) -> head; default `fsdeploy.heads.make_head`.
        transform_macs: MACs of a feature transform on (rows, dim); methods with a transform are skipped
            (and listed by `missing_counts`) without it.
        transform_params: numbers a transform fits per task, added to `params_adapted` (default: none).
    Raises:
        UnknownName: a method of unknown kind.
    """
    factory = make_head or _default_factory()
    skip = missing_counts(counts, methods, transform_macs=transform_macs)
    rows = [_row(m, counts, task, factory, transform_macs) for m in methods if m.key not in skip]
    if transform_params is None:
        return rows
    extra = {m.key: transform_params(m.transform, counts.dim) for m in methods if m.transform != "none"}
    return [replace(r, params_adapted=r.params_adapted + extra.get(r.method, 0)) for r in rows]


@dataclass(frozen=True)
class Cost:
    """What a cost formula returns for one method and task shape."""

    adapt: int
    query: int
    params: int
    head_part: int
    recipe: str
    backward: str


# (method, counts, task, head, tf) -> Cost, where tf(rows) is the method's transform MACs on `rows` features
Formula = Callable[[Method, CountedMacs, TaskShape, CountingHead, Callable[[int], int]], Cost]


def _load_kind_formulas() -> None:
    from fsdeploy.adapters import ADAPTERS

    for kind in ADAPTERS.values():  # an adapter kind with rows of its own carries their formula (case, toast, tsa)
        if kind.cost is not None:
            FORMULAS.add(kind.name, kind.cost)


FORMULAS: Registry[Formula] = Registry("cost formula (Method.kind)", _load_kind_formulas)


def register_formula(kind: str) -> Callable[[Formula], Formula]:
    """Decorator adding the cost formula of methods of `kind` (adapter kinds carry theirs: `AdapterKind.cost`)."""
    return FORMULAS.register(kind)


@register_formula("head")
def head_cost(m: Method, c: CountedMacs, task: TaskShape, head: CountingHead, tf: Callable[[int], int]) -> Cost:
    """Head methods: one forward of the support set + the head's fit (module docstring)."""
    n, k, d = task.n_support, task.ways, c.dim
    head_part = tf(n) + head.fit_macs(n, d, k)
    return Cost(n * c.backbone + head_part, c.backbone + tf(1) + head.predict_macs(1, d, k), head.n_params(d, k), head_part,
                f"1 forward of the support set + {head_text(m)} fit", BACKWARD_TEXT["head"])


@register_formula("finetune")
def finetune_cost(m: Method, c: CountedMacs, task: TaskShape, head: CountingHead, tf: Callable[[int], int]) -> Cost:
    """Fine-tuning recipes: S steps of batch B, forward + backward of the trained graph, joint classifier."""
    n, k, d = task.n_support, task.ways, c.dim
    g: TrainedGraph = getattr(c, m.graph)
    b = n if m.batch is None else m.batch
    s = m.steps or 0
    head_part = s * 3 * head.predict_macs(b, d, k)
    return Cost(s * b * (g.forward + g.backward) + head_part, g.forward + head.predict_macs(1, d, k), g.params + head.n_params(d, k),
                head_part, f"{s} steps x batch {'= support' if m.batch is None else b}, forward+backward, {m.head} classifier",
                BACKWARD_TEXT[m.graph])


def _row(
    m: Method, c: CountedMacs, task: TaskShape, factory: HeadFactory, transform_macs: TransformMacs | None
) -> CostRow:
    n, k = task.n_support, task.ways
    head = factory(m.head, **m.head_opts)
    if m.transform != "none" and m.kind not in TRANSFORM_KINDS:
        raise InvalidInput(f"method {m.key!r}: feature transforms apply to head methods only, not {m.kind!r}")
    formula = FORMULAS.get(m.kind, f"method {m.key!r} has an unknown kind")
    cost = formula(m, c, task, head, lambda rows: _tf(m, transform_macs, rows, c.dim))
    recipe = cost.recipe + (f" ({m.note})" if m.note else "")
    return CostRow(
        m.key, m.label, task.name or f"{k}-way, {n} support", k, n, recipe,
        m.steps, m.batch, cost.backward, int(cost.adapt), int(cost.query), int(cost.params), int(cost.head_part),
    )


def _tf(m: Method, transform_macs: TransformMacs | None, rows: int, dim: int) -> int:
    if m.transform == "none":
        return 0
    assert transform_macs is not None  # missing_counts skipped the method otherwise
    return int(transform_macs(m.transform, rows, dim))


def head_text(m: Method) -> str:
    return f"{m.head} head" if m.transform == "none" else f"{m.transform} transform + {m.head} head"


def measure_trained(
    model: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    trainable: Trainable,
    *,
    forward: int | None = None,
) -> TrainedGraph:
    """Count forward, backward (for `trainable`) and trained numbers of `model` at the given inputs.

    Use it on adapted models too, e.g. a TSA-wrapped backbone with `trainable` = its adapter names.
    `forward` skips the forward count when it is already known.
    """
    return TrainedGraph(
        count_macs(model, inputs).total if forward is None else forward,
        count_backward_macs(model, inputs, trainable).total,
        count_params(model, trainable),
    )


def measure_backbone(
    model: nn.Module, image_size: int | tuple[int, int], *, partial_from: str | None = None
) -> CountedMacs:
    """Count the frozen, full, partial and BN-affine graphs of a feature backbone at batch 1.

    Args:
        model: backbone returning features (1, D) (timm with num_classes=0).
        image_size: input side, or (height, width).
        partial_from: first module partial fine-tuning trains; default `last_block(model)`.
    Returns:
        CountedMacs with `case`, `tsa` and `toast` left None (count those graphs with `measure_trained`
        / `count_macs` on the adapted models and `dataclasses.replace` them in).
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    x = torch.zeros(1, 3, h, w)
    with torch.no_grad():
        feats = model(x)
    if feats.ndim != 2:
        raise InvalidInput(f"expected backbone features (1, D), got shape {tuple(feats.shape)}; use num_classes=0")
    forward = count_macs(model, x).total
    partial = params_from(model, partial_from or last_block(model))
    return CountedMacs(
        dim=int(feats.shape[1]),
        backbone=forward,
        full=measure_trained(model, x, None, forward=forward),
        partial=measure_trained(model, x, partial, forward=forward),
        bn_affine=measure_trained(model, x, norm_affine_params(model), forward=forward),
    )
