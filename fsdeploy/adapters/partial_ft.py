"""The `partial-ft` adapter kind: only the layers a searched spec names fine-tune, each at its own rate, per task.

Shen et al., "Partial Is Better Than All: Revisiting Fine-tuning Strategy for Few-shot Learning", AAAI 2021:
the layers to fine-tune and their learning-rate multipliers come from an evolutionary search on
base/validation-class tasks (`fsdeploy.train.partial_search`, `python -m fsdeploy.train.partial_search
BUNDLE DATA --out spec.json`), passed as `--spec spec.json`; the fine-tuning itself is Chen et al.'s loop
with a new linear head (`fsdeploy.train.finetune`, recipe chen: SGD 0.01, 100 epochs of batches of 4), the
unit's rate multiplier x 0.01, the head at 0.01. Without a spec it fine-tunes the last block and what follows
it (multiplier 1) and the head, the cost table's `partial-ft` row; the task's info records the `--spec` path when one was given. The task stores only the
trained tensors.
"""
from __future__ import annotations

from typing import Any

from fsdeploy.adapters.base import AdapterKind, register_adapter
from fsdeploy.adapters.full_ft import BN_HELP, LR_HELP, _rate, head, network_cost


def multipliers(backbone: Any, spec: str | None) -> dict[str, float]:
    """Unit -> learning-rate multiplier: from the spec file, or 1 on the last block and every unit after it
    (what `fsdeploy.bench.macs.params_from(last_block)` counts for the cost table).

    Raises:
        InvalidInput: an unreadable spec, or one searched on another backbone.
    """
    from fsdeploy.bench.macs import last_block
    from fsdeploy.train.partial_search import PartialSpec, units_of

    if spec is None:
        units, last = units_of(backbone), last_block(backbone)
        first = next((i for i, u in enumerate(units) if u == last or u.startswith(last + ".")), None)
        return {last: 1.0} if first is None else {u: 1.0 for u in units[first:]}
    loaded = PartialSpec.load(spec)
    loaded.check_backbone(backbone)
    return loaded.as_dict()


def fit(backbone: Any, images: Any, labels: Any, *, steps: int, spec: str | None = None, lr: float | None = None,
        bn: str | None = None, device: str | None = None) -> Any:
    """Chen et al.'s loop (`steps` = epochs) on the spec's units at their multipliers, plus a new linear head."""
    from fsdeploy.train.finetune import fit_finetune

    return fit_finetune(backbone, images, labels, steps=steps, recipe="chen", multipliers=multipliers(backbone, spec),
                        lr=_rate(lr), bn=bn, device=device)


def fit_macs(backbone: Any, size: int, n_support: int, steps: int, spec: str | None = None, **_: Any) -> int:
    from fsdeploy.train.finetune import finetune_adapt_macs

    return finetune_adapt_macs(backbone, size, n_support, steps, multipliers=multipliers(backbone, spec))


KIND = register_adapter(AdapterKind(
    name="partial-ft",
    summary="Partial fine-tuning (Shen et al.): the searched layers at their own rates + new linear head, folded and re-exported",
    bundle_adapter="none",
    fit=fit,
    head=head,
    fit_macs=fit_macs,
    cost=network_cost,
    methods={"partial-ft": {}},
    options={"spec": "JSON layer spec from `python -m fsdeploy.train.partial_search` (default: last block + head)",
             "lr": LR_HELP, "bn": BN_HELP + "; default frozen"},
    default_steps=100,
    steps_unit="epochs",
    steps_source="Chen et al.'s loop",
))
