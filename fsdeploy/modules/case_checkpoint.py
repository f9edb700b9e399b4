"""CaSE checkpoints: build a CaseNet from a plain or metatrain checkpoint, and write the metatrain layout.

Checkpoints accepted:
(a) a plain backbone checkpoint: every CaSE block starts at identity (γ = 1);
(b) a `metatrain` checkpoint: the backbone's own timm keys plus the CaSE blocks under `cases.<i>.…`
    (the CaseNet's `cases` state dict, prefixed), with fsdeploy metadata naming the model and listing the
    sites (`case_sites`). Backbone tensors load through `create_backbone`, which ignores the `cases.` keys.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fsdeploy.backbones import BuildRequest, Preprocess, create_backbone, family_of, read_checkpoint
from fsdeploy.errors import InvalidInput
from fsdeploy.modules.casenet import CaseNet

CASE_PREFIX = "cases."


def build_casenet(request: BuildRequest) -> tuple[CaseNet, Preprocess]:
    """Backbone from `request` (plain or metatrain checkpoint), wrapped with CaSE blocks, in eval mode."""
    backbone, pre = create_backbone(
        request.model, checkpoint=request.checkpoint, pretrained=request.pretrained, img_size=request.img_size
    )
    net = CaseNet(backbone, family=family_of(request.model))
    if request.checkpoint is not None:
        load_case_params(net, request.checkpoint)
    return net.eval(), pre


def load_case_params(net: CaseNet, checkpoint: str | Path) -> bool:
    """Load `cases.*` tensors from a metatrain checkpoint into `net`; False when the file has none (identity).

    Raises:
        InvalidInput: the CaSE tensors were trained for other sites or channel counts.
    """
    state, meta = read_checkpoint(checkpoint)
    case_state = {k[len(CASE_PREFIX):]: v for k, v in state.items() if k.startswith(CASE_PREFIX)}
    if not case_state:
        return False
    sites = meta.get("case_sites")
    if sites is not None and list(sites) != [s.name for s in net.layout]:
        raise InvalidInput(
            f"checkpoint {checkpoint} holds CaSE blocks for sites {sites[:3]}...; this model's sites are "
            f"{[s.name for s in net.layout][:3]}...; metatrain again for this model"
        )
    try:
        net.cases.load_state_dict(case_state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise InvalidInput(f"CaSE tensors in {checkpoint} do not fit this model: {first}; metatrain again for it") from None
    return True


def case_checkpoint_state(net: CaseNet) -> dict[str, torch.Tensor]:
    """The metatrain checkpoint layout: backbone under its timm keys, CaSE blocks under `cases.`."""
    state = {k: v for k, v in net.backbone.state_dict().items()}
    state.update({CASE_PREFIX + k: v for k, v in net.cases.state_dict().items()})
    return state
