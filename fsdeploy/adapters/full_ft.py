"""The `full-ft` adapter kind: every backbone weight and a new linear head fine-tuned per task, folded and re-exported.

Recipe: Chen et al., "A Closer Look at Few-shot Classification", ICLR 2019, baseline fine-tuning (SGD lr
0.01, momentum 0.9, dampening 0.9, weight decay 1e-3, 100 epochs of batches of 4, nn.Linear default init,
no augmentation), applied to the backbone as well as the head; `--optimizer olor` runs OLOR as published
on the backbone (Adam lr 1e-4, warm-up then cosine; the head plain Adam). Details and deliberate differences:
`fsdeploy.train.finetune`. The stored head is that jointly trained linear classifier; the task stores
every backbone tensor (the whole network per task).
"""
from __future__ import annotations

from typing import Any

from fsdeploy.adapters.base import AdapterKind, register_adapter

OPTIMIZERS = {"sgd": "chen", "olor": "olor"}


def fit(backbone: Any, images: Any, labels: Any, *, steps: int, optimizer: str = "sgd", lr: float | None = None,
        bn: str | None = None, device: str | None = None) -> Any:
    """Chen et al.'s fine-tuning loop on the whole network (`steps` = epochs), SGD or OLOR; `lr` overrides the rate."""
    from fsdeploy.errors import InvalidInput
    from fsdeploy.train.finetune import fit_finetune

    if optimizer not in OPTIMIZERS:
        raise InvalidInput(f"unknown --optimizer {optimizer!r} for --adapter full-ft; choose one of {', '.join(OPTIMIZERS)}")
    return fit_finetune(backbone, images, labels, steps=steps, recipe=OPTIMIZERS[optimizer], lr=_rate(lr), bn=bn,
                        device=device)


LR_HELP = "learning rate instead of the recipe's (a deliberate deviation, e.g. where the recipe's rate diverges)"
BN_HELP = ("BatchNorm while fitting: frozen (pretrained running statistics, eval mode: Chen et al.'s features) or batch "
           "(batch statistics, MAML's; running statistics updated and stored with the task)")


def _rate(lr: Any) -> float | None:
    from fsdeploy.errors import InvalidInput

    if lr is None:
        return None
    try:
        value = float(lr)
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0:
        raise InvalidInput(f"--lr must be a positive number, got {lr!r}")
    return value


def head(result: Any) -> Any:
    from fsdeploy.train.finetune import trained_linear

    return trained_linear(result.weight, result.bias)


def fit_macs(backbone: Any, size: int, n_support: int, steps: int, **_: Any) -> int:  # fit options do not change it
    from fsdeploy.train.finetune import finetune_adapt_macs

    return finetune_adapt_macs(backbone, size, n_support, steps)


def network_cost(m: Any, c: Any, task: Any, head: Any, tf: Any) -> Any:
    """S passes over the support set (epochs of batches, or whole-set steps), forward + backward of the trained
    graph `m.graph`, and the linear classifier's forward, weight and input gradient on every image."""
    from fsdeploy.bench.costs import BACKWARD_TEXT, Cost

    n, k, d = task.n_support, task.ways, c.dim
    g = getattr(c, m.graph)
    s = m.steps or 0
    head_part = s * 3 * head.predict_macs(n, d, k)
    how = f"{s} epochs x batches of {m.batch}" if m.batch else f"{s} steps x whole support"
    return Cost(s * n * (g.forward + g.backward) + head_part, g.forward + head.predict_macs(1, d, k), g.params + head.n_params(d, k),
                head_part, f"{how}, forward+backward, linear classifier", BACKWARD_TEXT[m.graph])


KIND = register_adapter(AdapterKind(
    name="full-ft",
    summary="Full fine-tuning: backbone + new linear head, Chen et al.'s loop (100 epochs, batch 4), folded and re-exported",
    bundle_adapter="none",
    fit=fit,
    head=head,
    fit_macs=fit_macs,
    cost=network_cost,
    methods={"full-ft": {}, "full-ft-olor": {"optimizer": "olor"}},
    options={"optimizer": "sgd (Chen et al.: lr 0.01, momentum 0.9, dampening 0.9, wd 1e-3) or olor (OLOR on the "
                          "backbone: Adam lr 1e-4 cosine, rollback towards the pretrained weights; head plain Adam)",
             "lr": LR_HELP, "bn": BN_HELP + "; default frozen"},
    default_steps=100,
    steps_unit="epochs",
    steps_source="Chen et al. ICLR 2019, CloserLookFewShot methods/baselinefinetune.py:40",
))
