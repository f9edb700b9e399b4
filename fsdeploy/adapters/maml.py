"""The `maml` adapter kind: MAML's inner loop on the whole network + a zero-initialised linear head, per task.

Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017: plain
SGD at the inner learning rate 0.01 (miniImageNet), each step on the whole support set; `maml-10` runs the
paper's 10 test-time steps, `maml-100` the 100 steps of a fine-tuning baseline (the seed's "what if MAML's
inner loop runs longer"). There is no meta-trained initialisation here: the loop starts from the
pretrained backbone and a zero head, so this measures MAML's adaptation rule, not meta-learned MAML.
First-order or not is irrelevant at adaptation time (second-order terms belong to the outer loop).
BatchNorm normalises with batch statistics while fitting, as in MAML (cbfinn/maml `utils.py:41`); the deployed
graph normalises with the running statistics accumulated on the way (stored with the task), where MAML
would use the query batch's. `bn=frozen` is the other mode. Details: `fsdeploy.train.finetune`.
"""
from __future__ import annotations

from typing import Any

from fsdeploy.adapters.base import AdapterKind, register_adapter
from fsdeploy.adapters.full_ft import BN_HELP, LR_HELP, _rate, fit_macs, head, network_cost


def fit(backbone: Any, images: Any, labels: Any, *, steps: int, lr: float | None = None, bn: str | None = None,
        device: str | None = None) -> Any:
    """`steps` SGD steps (lr 0.01) of the whole network and a zero head on the whole support set."""
    from fsdeploy.train.finetune import fit_finetune

    return fit_finetune(backbone, images, labels, steps=steps, recipe="maml", lr=_rate(lr), bn=bn, device=device)


KIND = register_adapter(AdapterKind(
    name="maml",
    summary="MAML inner loop: SGD lr 0.01 on the whole network + zero head, whole support per step, folded and re-exported",
    bundle_adapter="none",
    fit=fit,
    head=head,
    fit_macs=fit_macs,
    cost=network_cost,
    methods={"maml-10": {}, "maml-100": {}},
    options={"lr": LR_HELP, "bn": BN_HELP + "; default batch (MAML's)"},
    default_steps=10,
    steps_source="Finn et al. 2017 Sec. 5.2 miniImageNet test time, cbfinn/maml main.py:228",
))
