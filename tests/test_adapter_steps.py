"""Each per-task fine-tuner's default fit length is its published one, and it reaches the kind's fit.

`adapt --steps` used to default to 40 for every kind (40 epochs of Chen et al.'s loop, 40 MAML steps). The
expected numbers below are written from the papers/official code, not read from the registry:
TSA 40 (VICO-UoE/URL test_extractor_tsa.py), BN-affine TSA's loop, Chen et al.'s 100 epochs
(CloserLookFewShot methods/baselinefinetune.py:40), MAML's 10 test-time steps (Finn et al. 2017 Sec. 5.2,
cbfinn/maml main.py:228), eTT 40 (chmxu/eTT_TMLR2022 test_extractor_pa_vit_prefix.py:100).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fsdeploy.adapters import ADAPTERS, finetuners
from fsdeploy.errors import InvalidInput

PUBLISHED = {"tsa": (40, "steps"), "bn-affine": (40, "steps"), "full-ft": (100, "epochs"), "partial-ft": (100, "epochs"),
             "maml": (10, "steps"), "ett": (40, "steps")}


class Reached(Exception):
    def __init__(self, steps: int, opts: dict | None = None) -> None:
        super().__init__(steps)
        self.steps, self.opts = steps, opts or {}


def _spy(kind):
    def fit(backbone, images, labels, *, steps, **opts):
        raise Reached(steps, opts)

    return replace(kind, fit=fit, families=())  # families=(): the spy runs on the resnet bundle whatever the kind


def test_every_fine_tuner_has_its_published_default() -> None:
    assert {k: (ADAPTERS.get(k).default_steps, ADAPTERS.get(k).steps_unit) for k in finetuners()} == PUBLISHED


def test_defaults_match_the_training_modules() -> None:
    from fsdeploy.train.ett import ETT_STEPS
    from fsdeploy.train.finetune import CHEN_EPOCHS, MAML_TEST_STEPS
    from fsdeploy.train.tsa import ADAPT_STEPS

    assert (ADAPT_STEPS, CHEN_EPOCHS, MAML_TEST_STEPS, ETT_STEPS) == (40, 100, 10, 40)
    assert ADAPTERS.get("full-ft").default_steps == CHEN_EPOCHS and ADAPTERS.get("maml").default_steps == MAML_TEST_STEPS


@pytest.fixture(scope="module")
def bundle_and_support(tmp_path_factory):
    from fsdeploy.data.folders import scan_image_folder
    from fsdeploy.data.images import load_checked
    from tests.helpers import glyph_folder, tiny_bundle

    root = tmp_path_factory.mktemp("steps")
    bundle = tiny_bundle(root)
    support = glyph_folder(root / "support", classes="AB", per_class=2, size=32)
    files = scan_image_folder(support)
    return bundle, support, load_checked(files.paths, bundle.manifest.preprocess), np.asarray(files.labels)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_default_reaches_the_fit(bundle_and_support, monkeypatch, name) -> None:
    from fsdeploy.runtime import TaskAdapter

    bundle, _, images, labels = bundle_and_support
    monkeypatch.setitem(ADAPTERS._entries, name, _spy(ADAPTERS.get(name)))
    with pytest.raises(Reached) as got:
        TaskAdapter(bundle, adapter=name).adapt(images, labels, ["A", "B"])
    assert got.value.steps == PUBLISHED[name][0]
    with pytest.raises(Reached) as got:  # an explicit value still wins
        TaskAdapter(bundle, adapter=name, steps=3).adapt(images, labels, ["A", "B"])
    assert got.value.steps == 3


def test_cli_adapt_uses_the_kinds_default_and_lists_them(bundle_and_support, monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from fsdeploy.cli import app

    bundle, support, _, _ = bundle_and_support
    runner = CliRunner(env={"COLUMNS": "400"})
    for name in ("maml", "full-ft"):
        monkeypatch.setitem(ADAPTERS._entries, name, _spy(ADAPTERS.get(name)))
        res = runner.invoke(app, ["adapt", str(bundle.path), str(support), "--adapter", name, "--out", str(tmp_path / "t.npz")])
        assert isinstance(res.exception, Reached) and res.exception.steps == PUBLISHED[name][0], res.output
    text = " ".join(runner.invoke(app, ["adapt", "--help"]).output.split())
    for name, (steps, unit) in PUBLISHED.items():
        assert f"{name} {steps} {unit}" in text


def test_a_kind_without_a_default_asks_for_steps() -> None:
    kind = replace(ADAPTERS.get("tsa"), default_steps=None)
    assert kind.resolve_steps(7) == 7
    with pytest.raises(InvalidInput, match="pass --steps"):
        kind.resolve_steps(None)


def test_cli_bn_and_lr_reach_the_fit_of_the_kinds_that_take_them(bundle_and_support, monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from fsdeploy.cli import app

    bundle, support, _, _ = bundle_and_support
    runner = CliRunner(env={"COLUMNS": "400"})
    base = ["adapt", str(bundle.path), str(support), "--out", str(tmp_path / "t.npz")]
    monkeypatch.setitem(ADAPTERS._entries, "maml", _spy(ADAPTERS.get("maml")))
    res = runner.invoke(app, [*base, "--adapter", "maml", "--bn", "frozen", "--lr", "0.001"])
    assert isinstance(res.exception, Reached) and res.exception.opts == {"bn": "frozen", "lr": 0.001}, res.output
    res = runner.invoke(app, [*base, "--adapter", "tsa", "--bn", "batch"])
    assert isinstance(res.exception, InvalidInput)  # the CLI's entry point prints it as one `error:` line
    assert "--bn does not apply to --adapter tsa; it is for --adapter full-ft, maml, partial-ft" in str(res.exception)


def test_timed_adaptation_uses_each_cost_table_methods_own_steps(bundle_and_support, monkeypatch) -> None:
    """`bench.measure.adaptation_times` times maml-100 at 100 steps (its cost-table row), not MAML's default 10, the
    same steps the accuracy loop fits with; an explicit `steps` still applies to every method."""
    from fsdeploy.bench.costs import DEFAULT_METHODS
    from fsdeploy.bench.measure import adaptation_times
    from fsdeploy.bench.methods import adaptation_specs

    bundle, support, _, _ = bundle_and_support
    monkeypatch.setitem(ADAPTERS._entries, "maml", _spy(ADAPTERS.get("maml")))
    seen: list[int] = []

    def record(*args, **kw):
        seen.append(kw["steps"])
        raise Reached(kw["steps"])

    monkeypatch.setattr("fsdeploy.runtime.adapt_task", record)
    with pytest.raises(Reached):
        adaptation_times(bundle, support, adaptation_specs(["maml-100"]), repeats=1)
    with pytest.raises(Reached):
        adaptation_times(bundle, support, adaptation_specs(["maml-10"]), repeats=1)
    with pytest.raises(Reached):
        adaptation_times(bundle, support, adaptation_specs(["maml-100"]), repeats=1, steps=7)
    own = {m.key: m.steps for m in DEFAULT_METHODS}
    assert (own["maml-100"], own["maml-10"]) == (100, 10)
    assert seen == [100, 10, 7]
