"""The `tsa` adapter kind: task-specific residual adapters α and the pre-classifier alignment β, fitted per task.

Li, Liu, Bilen, "Cross-domain Few-shot Learning with Task-specific Adapters", CVPR 2022 (arXiv 2107.00358);
β from URL (Li, Liu, Bilen, ICCV 2021). α folds exactly into the 3x3 convs (`fsdeploy.modules.fold`), so the
task's graph is the plain ResNet with new weights; the stored head is β-aligned cosine NCC (`lt-ncc`, steps 0).
"""
from __future__ import annotations

from typing import Any

from fsdeploy.adapters.base import AdapterKind, register_adapter


def fit(backbone: Any, images: Any, labels: Any, *, steps: int, domain: str = "unseen", device: str | None = None) -> Any:
    """TSA's fit at the learning rates of `domain` (upstream's test_extractor_tsa: seen or unseen)."""
    from fsdeploy.errors import InvalidInput
    from fsdeploy.train.tsa import TSA_LEARNING_RATES, fit_tsa

    if domain not in TSA_LEARNING_RATES:
        raise InvalidInput(f"unknown --domain {domain!r}; choose one of {', '.join(TSA_LEARNING_RATES)}")
    lr_alpha, lr_beta = TSA_LEARNING_RATES[domain]
    return fit_tsa(backbone, images, labels, steps=steps, lr_alpha=lr_alpha, lr_beta=lr_beta, device=device)


def head(result: Any) -> Any:
    from fsdeploy.heads.pipeline import TaskModel

    return TaskModel.create("lt-ncc", "none", steps=0, init=result.beta)


def fit_macs(backbone: Any, size: int, n_support: int, steps: int, **_: Any) -> int:  # fit options do not change it
    from fsdeploy.train.tsa import tsa_adapt_macs

    return tsa_adapt_macs(backbone, size, n_support, steps=steps)


def tsa_cost(m: Any, c: Any, task: Any, head: Any, tf: Any) -> Any:
    """S steps on the whole support set with the NCC loss, then one pass to build the final prototypes."""
    from fsdeploy.bench.costs import BACKWARD_TEXT, Cost

    n, k, d = task.n_support, task.ways, c.dim
    g = c.tsa
    s = m.steps or 0
    loss = head.fit_macs(n, d, k) + head.predict_macs(n, d, k)
    head_part = s * 3 * loss + head.fit_macs(n, d, k)
    return Cost(s * n * (g.forward + g.backward) + n * g.forward + head_part, g.forward + head.predict_macs(1, d, k),
                g.params + head.n_params(d, k), head_part,
                f"{s} steps x whole support, forward+backward, {m.head} loss; 1 final support pass", BACKWARD_TEXT["tsa"])


KIND = register_adapter(AdapterKind(
    name="tsa",
    summary="TSA: residual adapters α on every 3x3 conv + alignment β, 40 steps per task, folded and re-exported (ResNet)",
    bundle_adapter="none",
    families=("resnet",),
    fit=fit,
    head=head,
    fit_macs=fit_macs,
    cost=tsa_cost,
    methods={"tsa": {}, "tsa-seen": {"domain": "seen"}},
    options={"domain": "unseen (α 0.5, β 1.0: images unlike the backbone's training data) or seen (α 0.05, β 0.1)"},
    why_missing="TSA residual adapters are defined for ResNet backbones only",
    default_steps=40,
    steps_source="VICO-UoE/URL test_extractor_tsa.py max_iter",
))
