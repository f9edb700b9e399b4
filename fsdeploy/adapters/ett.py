"""The `ett` adapter kind: eTT's attentive prefix tuning + domain residual adapters, fitted per task (ViT only).

Xu et al., "Exploring Efficient Few-shot Adaptation for Vision Transformers", TMLR 2023 (official code
chmxu/eTT_TMLR2022). The fit (`fsdeploy.train.ett`) tunes one prefix token per class (initialised from
attentive prototypes), its `control_trans` map, the DRA offsets and the pre-classifier map vartheta on the
support set. The task graph is the bundle's ViT re-exported with the DRA folded into its biases and the
prefix keys/values as constants; vartheta becomes the stored head's alignment (cosine NCC, as TSA's beta).
The prefixes make the task graph's attention K tokens wider than the plain ViT's (K = the task's ways).
"""
from __future__ import annotations

from typing import Any

from fsdeploy.adapters.base import AdapterKind, register_adapter


def fit(backbone: Any, images: Any, labels: Any, *, steps: int, lr: float | str | None = None, device: str | None = None) -> Any:
    """eTT's per-task fit: `steps` AdamW steps at learning rate `lr` (official default 1e-3)."""
    from fsdeploy.errors import InvalidInput
    from fsdeploy.train.ett import ETT_LR, fit_ett

    try:
        rate = ETT_LR if lr is None else float(lr)
    except ValueError:
        raise InvalidInput(f"--lr must be a number (eTT's official default is {ETT_LR}); got {lr!r}") from None
    if not rate > 0:
        raise InvalidInput(f"--lr must be > 0; got {lr!r}")
    return fit_ett(backbone, images, labels, steps=steps, lr=rate, device=device)


def head(result: Any) -> Any:
    from fsdeploy.heads.pipeline import TaskModel

    return TaskModel.create("lt-ncc", "none", steps=0, init=result.beta)


def ett_cost(m: Any, c: Any, task: Any, head: Any, tf: Any) -> Any:
    """eTT's fit counted from `CountedMacs.ett` (`fsdeploy.modules.ett.EttCounts`) for the task's ways: the
    attentive-prototype pass and S steps on the whole support set (`EttCounts.fit`, the count `adapt --adapter
    ett` records per task), the NCC loss of each step (forward + 2x backward), then one pass of the support set
    through the task graph (K prefix tokens) and vartheta, and the head's fit. Queries: the task graph,
    vartheta and the head. Stored: the folded biases, vartheta, K prefix keys/values and the head."""
    from fsdeploy.bench.costs import Cost

    n, k, d = task.n_support, task.ways, c.dim
    e = c.ett
    s = m.steps or 0
    head_part = s * 3 * (head.fit_macs(n, d, k) + head.predict_macs(n, d, k)) + head.fit_macs(n, d, k)
    return Cost(e.fit(n, k, s) + n * (e.forward(k) + e.align) + head_part, e.forward(k) + e.align + head.predict_macs(1, d, k),
                e.params(k) + head.n_params(d, k), head_part,
                f"attentive-prototype pass + {s} steps x whole support, forward+backward, NCC loss + PR; 1 final pass",
                "frozen ViT: input grads + prefix/DRA/vartheta grads")


KIND = register_adapter(AdapterKind(
    name="ett",
    summary="eTT: attentive prefix tuning + domain residual adapters, 40 steps per task, re-exported with the prefixes (ViT)",
    bundle_adapter="none",
    families=("vision_transformer",),
    fit=fit,
    head=head,
    cost=ett_cost,
    methods={"ett": {}},
    options={"lr": "AdamW learning rate of vartheta (the prefixes, control_trans and DRA use lr/2); official 1e-3, "
                   "5e-4 for ImageNet-like images"},
    why_missing="eTT's prefixes and domain residual adapters are defined for ViT backbones only",
    default_steps=40,
    steps_source="chmxu/eTT_TMLR2022 test_extractor_pa_vit_prefix.py:100",
))
