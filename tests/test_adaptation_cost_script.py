"""benchmarks/adaptation_cost.py's searched partial-ft row: counted for the spec's units, in the cost table's
convention (a spec of the default last block gives exactly the table's partial-ft graph)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("adaptation_cost", ROOT / "benchmarks" / "adaptation_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from tests.helpers import tiny_bundle

    return tiny_bundle(tmp_path_factory.mktemp("acs"))


def _spec(path: Path, bundle, pick) -> Path:
    from fsdeploy.bench.cost_inputs import torch_model
    from fsdeploy.train.partial_search import PartialSpec, units_of

    units = tuple(units_of(torch_model(bundle)))
    return PartialSpec(units, tuple(pick(i, u, len(units)) for i, u in enumerate(units)), model="resnet18").save(path)


def test_searched_partial_of_the_last_block_equals_the_cost_tables_partial_graph(script, bundle, tmp_path) -> None:
    from fsdeploy.bench.cost_inputs import count_bundle

    from fsdeploy.adapters.partial_ft import multipliers
    from fsdeploy.bench.cost_inputs import torch_model

    counts = count_bundle(bundle)
    default = multipliers(torch_model(bundle), None)  # the last block and what follows, at 1
    assert default == {"layer4.1": 1.0}
    last = _spec(tmp_path / "last.json", bundle, lambda i, u, n: default.get(u, 0.0))
    got, methods = script.searched_partial(bundle, counts, last)
    assert got.partial == counts.partial  # forward, backward and params, from an independent counter
    row = next(m for m in methods if m.key == "partial-ft")
    assert row.label == script.SEARCHED and row.graph == "partial"


def test_searched_partial_counts_what_the_spec_trains(script, bundle, tmp_path) -> None:
    """Training only the stem needs input gradients back through the whole network, so its backward is far above the
    last block's though it trains 9,408 numbers; training every unit equals the full graph."""
    from fsdeploy.bench.cost_inputs import count_bundle

    counts = count_bundle(bundle)
    stem, _ = script.searched_partial(bundle, counts, _spec(tmp_path / "stem.json", bundle,
                                                            lambda i, u, n: 1.0 if u == "conv1" else 0.0))
    every, _ = script.searched_partial(bundle, counts, _spec(tmp_path / "all.json", bundle, lambda i, u, n: 0.1))
    conv1 = 3 * 64 * 7 * 7
    assert stem.partial.params == conv1 and every.partial.params == counts.full.params
    assert every.partial.backward == counts.full.backward
    assert counts.partial.backward < stem.partial.backward < counts.full.backward
