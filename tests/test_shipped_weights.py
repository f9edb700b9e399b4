"""The shipped glyph checkpoints: each loads as its model at its size, the model card records its real hash, and
the benchmarks pick it (and only at the size it was trained at)."""
from __future__ import annotations

import re

import pytest

from fsdeploy.atomic import sha256_file
from fsdeploy.backbones import create_backbone, read_checkpoint
from fsdeploy.bench.workspace import pick_weights
from fsdeploy.errors import InvalidInput
from fsdeploy.weights import SHIPPED, model_card, shipped_checkpoint

RECORDS = list(SHIPPED.values())


@pytest.mark.parametrize("record", RECORDS, ids=[r.model for r in RECORDS])
def test_shipped_checkpoint_loads_as_its_model_at_its_size(record):
    path = shipped_checkpoint(record.model)
    _, meta = read_checkpoint(path)
    assert meta["model"] == record.model
    assert int(meta["input_size"][-1]) == record.img_size
    model, pre = create_backbone(record.model, checkpoint=path)
    assert int(pre.input_size[-1]) == record.img_size
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("record", RECORDS, ids=[r.model for r in RECORDS])
def test_model_card_records_the_shipped_hash(record):
    card = model_card().read_text()
    section = card.split(f"# {record.file}", 1)
    assert len(section) == 2, f"MODEL_CARD.md has no '# {record.file}' section"
    digest = re.search(r"\| sha256 \| `([0-9a-f]{64})` \|", section[1])
    assert digest is not None and digest.group(1) == sha256_file(record.path())
    if record.case_file:
        assert f"# {record.case_file}" in card or record.case_file in card


@pytest.mark.parametrize("record", RECORDS, ids=[r.model for r in RECORDS])
def test_benchmarks_pick_the_shipped_checkpoint_only_at_its_size(record, tmp_path):
    picked = pick_weights(record.model, tmp_path, record.img_size)
    assert picked.path == record.path()
    other = pick_weights(record.model, tmp_path, record.img_size * 2)
    assert other.path != record.path() and "random init" in other.description
    assert f"{record.img_size} px" in other.description


def test_unknown_model_has_no_shipped_checkpoint():
    with pytest.raises(InvalidInput, match="ships no checkpoint for 'mobilenetv3_small_100'"):
        shipped_checkpoint("mobilenetv3_small_100")
