"""The adapter-kind record and its registry: everything generic code needs to know about one kind.

An adapter kind is how a frozen backbone adapts to a task. Two shapes exist:
- *exported* kinds (`none`, `case`, `toast`) are part of the bundle: `build` makes the torch module and
  its graphs at export, `feature_path` runs them on the device (support half once per task, query half
  per request);
- *per-task fine-tuners* (`tsa`, `bn-affine`, `full-ft`, `partial-ft`, `maml`) run on a bundle of kind `bundle_adapter`: `fit` trains the
  support set in PyTorch, folds the result into the plain weights, and the task carries the re-exported
  graph; `head` is the head they store.

Each kind lives in its own file under `fsdeploy/adapters/` and registers one `AdapterKind`; generic code
(export, runtime, benchmarks, CLI help) only reads `ADAPTERS`. Kind files import torch and the layers above
lazily, inside their functions, so the registry also loads where torch is absent (a Triton Python backend), which imports every module of the package the
first time it is read: a new kind is one new file plus its test.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fsdeploy.errors import InvalidInput
from fsdeploy.registry import Registry, import_package_modules


@dataclass(frozen=True)
class AdapterKind:
    """One adapter kind.

    Attributes:
        name: the name users type (`--adapter NAME`).
        summary: one line for `--help` and listings.
        build: exported kinds: `BuildRequest -> AdaptedModel` (torch module + graphs).
        feature_path: exported kinds: `(bundle, backend, options, **kw) -> FeaturePath`.
        count: `(rebuilt torch module, image size) -> CountedMacs` for the cost table.
        cost: the cost formula of cost-table rows of this kind (`Method.kind == name`; see
            `fsdeploy.bench.costs.Formula`), when the kind has rows of its own.
        bundle_adapter: fine-tuners: the exported kind whose bundles they adapt (e.g. "none").
        families: timm families the kind supports (empty: any backbone).
        fit: fine-tuners: `(backbone, images, labels, steps, **opts) -> result` with `.model` (the fitted
            torch network), `.folded_state()` and `.task_weights()`.
        head: fine-tuners: `(fit result) -> TaskModel`, the head the task stores.
        fit_macs: fine-tuners: `(backbone, image size, n support, steps, **fit options) -> MACs` of the fit.
        default_heads: head methods `bench accuracy` runs on this kind's features by default.
        head_methods: head method key -> cost-table method key on this kind's features (linear -> case-linear).
        methods: fine-tuners: cost-table method key -> the fit options it stands for (tsa: {}, tsa-seen:
            {"domain": "seen"}), so `bench accuracy` and `bench macs` take each variant by name.
        why_missing: what a user does when the kind's costs cannot be counted on a bundle.
        options: fit options the kind accepts (`adapt --domain`, `--optimizer`), with their meaning; any
            other option given to it is refused.
        default_steps: fine-tuners: the published length of the per-task fit, what `adapt --steps`, `TaskAdapter`
            and `adapt_task` use when no steps are given (TSA 40 steps, Chen et al.'s 100 epochs, MAML's 10
            test-time steps, ...); counted in `steps_unit`.
        steps_unit: what one step of `default_steps` is: "steps" (optimiser steps on the whole support set) or
            "epochs" (passes over the support set in mini-batches).
        steps_source: where `default_steps` comes from (paper section or official file:line), for `--help`.
    """

    name: str
    summary: str
    build: Callable[..., Any] | None = None
    feature_path: Callable[..., Any] | None = None
    count: Callable[..., Any] | None = None
    cost: Callable[..., Any] | None = None
    bundle_adapter: str | None = None
    families: tuple[str, ...] = ()
    fit: Callable[..., Any] | None = None
    head: Callable[[Any], Any] | None = None
    fit_macs: Callable[..., int] | None = None
    default_heads: tuple[str, ...] = ()
    head_methods: dict[str, str] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    why_missing: str = ""
    options: dict[str, str] = field(default_factory=dict)
    default_steps: int | None = None
    steps_unit: str = "steps"
    steps_source: str = ""

    @property
    def exported(self) -> bool:
        return self.build is not None

    @property
    def finetuner(self) -> bool:
        return self.fit is not None

    def resolve_steps(self, steps: int | None) -> int:
        """`steps` if given, else this kind's published default.

        Raises:
            InvalidInput: a fine-tuner without a default and no steps given.
        """
        if steps is not None:
            return int(steps)
        if self.default_steps is None:
            raise InvalidInput(f"--adapter {self.name} has no default number of steps; pass --steps")
        return self.default_steps

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse fit options this kind does not take, naming the kinds that do.

        Raises:
            InvalidInput: an option outside `options`.
        """
        for key in options:
            if key not in self.options:
                takers = [k.name for k in ADAPTERS.values() if key in k.options]
                where = f"it is for --adapter {', '.join(takers)}" if takers else "no adapter takes it"
                raise InvalidInput(f"--{key} does not apply to --adapter {self.name}; {where}")

    def check_family(self, family: str, where: str) -> None:
        """Refuse a backbone family the kind does not support.

        Raises:
            InvalidInput: `family` is not among `families`.
        """
        if self.families and family not in self.families:
            raise InvalidInput(f"the {self.name} adapter is defined for {', '.join(self.families)} backbones; {where} is a {family}")


def _load_builtin() -> None:
    import_package_modules("fsdeploy.adapters", skip=("base", "folded"))  # folded: the fine-tuners' shared fit, loaded on use


ADAPTERS: Registry[AdapterKind] = Registry("adapter kind", _load_builtin)


def register_adapter(kind: AdapterKind) -> AdapterKind:
    """Add `kind` to ADAPTERS (at import of its file)."""
    return ADAPTERS.add(kind.name, kind)


def adapter_kind(name: str) -> AdapterKind:
    return ADAPTERS.get(name)


def exported_kinds() -> list[str]:
    return [k.name for k in ADAPTERS.values() if k.exported]


def finetuners() -> list[str]:
    return [k.name for k in ADAPTERS.values() if k.finetuner]


def finetuner_methods() -> dict[str, tuple[str, dict[str, Any]]]:
    """Cost-table method key -> (fine-tuner kind, fit options), for every per-task fine-tuner."""
    return {key: (k.name, dict(opts)) for k in ADAPTERS.values() if k.finetuner for key, opts in k.methods.items()}


def steps_help() -> str:
    """Every fine-tuner's default `--steps`, from the registry (for `adapt --help`)."""
    return "; ".join(f"{k.name} {k.default_steps} {k.steps_unit}" + (f" ({k.steps_source})" if k.steps_source else "")
                     for k in ADAPTERS.values() if k.finetuner)


def build_adapted(adapter: str, request: Any) -> Any:
    """Run the builder of exported kind `adapter` on a `BuildRequest`.

    Raises:
        UnknownName: not a registered kind; InvalidInput: a fine-tuner (it runs on a plain bundle).
    """
    kind = ADAPTERS.get(adapter)
    if kind.build is None:
        raise InvalidInput(
            f"the {adapter} adapter is fitted per task on a bundle of adapter {kind.bundle_adapter}; export with "
            f"--adapter {kind.bundle_adapter} and run `fsdeploy adapt BUNDLE SUPPORT --adapter {adapter}`"
        )
    return kind.build(request)
