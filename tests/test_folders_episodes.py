"""ImageFolder scanning errors and seeded episode sampling."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fsdeploy.data.episodes import sample_episode, sample_variable_episode
from fsdeploy.data.folders import scan_image_folder
from fsdeploy.errors import InvalidInput


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_scan_lists_classes_sorted(tmp_path) -> None:
    for c in ("b", "a"):
        for i in range(3):
            _img(tmp_path / c / f"{i}.png")
    files = scan_image_folder(tmp_path)
    assert files.classes == ("a", "b")
    assert files.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert all(p.parent.name == files.classes[y] for p, y in zip(files.paths, files.labels))


def test_scan_errors(tmp_path) -> None:
    with pytest.raises(InvalidInput, match="is not a folder"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no class sub-folders"):
        scan_image_folder(tmp_path / "empty")
    _img(tmp_path / "one" / "a" / "0.png")
    with pytest.raises(InvalidInput, match="needs at least 2 classes"):
        scan_image_folder(tmp_path / "one")
    _img(tmp_path / "two" / "a" / "0.png")
    (tmp_path / "two" / "b").mkdir(parents=True)
    with pytest.raises(InvalidInput, match="with no images .*: b"):
        scan_image_folder(tmp_path / "two")
    _img(tmp_path / "two" / "b" / "0.png")
    (tmp_path / "two" / "b" / "readme.txt").write_text("x")
    with pytest.raises(InvalidInput, match="non-image files .*readme.txt"):
        scan_image_folder(tmp_path / "two")


def test_episode_is_deterministic_and_disjoint() -> None:
    labels = np.repeat(np.arange(12), 10)
    a = sample_episode(labels, 5, 3, 4, np.random.default_rng(7))
    b = sample_episode(labels, 5, 3, 4, np.random.default_rng(7))
    np.testing.assert_array_equal(a.support, b.support)
    np.testing.assert_array_equal(a.query, b.query)
    assert not set(a.support) & set(a.query)
    assert np.bincount(a.support_labels).tolist() == [3] * 5
    assert np.bincount(a.query_labels).tolist() == [4] * 5
    # relabelled episode classes map back to dataset labels
    np.testing.assert_array_equal(labels[a.support], a.classes[a.support_labels])
    np.testing.assert_array_equal(labels[a.query], a.classes[a.query_labels])


def test_episode_respects_class_pool_and_errors() -> None:
    labels = np.repeat(np.arange(10), 6)
    pool = np.array([1, 3, 5, 7, 9])
    ep = sample_episode(labels, 5, 1, 2, np.random.default_rng(0), classes=pool)
    assert set(ep.classes.tolist()) == set(pool.tolist())
    with pytest.raises(InvalidInput, match="needs 6 classes"):
        sample_episode(labels, 6, 1, 2, np.random.default_rng(0), classes=pool)


def test_variable_episode_budget() -> None:
    labels = np.repeat(np.arange(60), 30)
    for seed in range(5):
        ep = sample_variable_episode(labels, np.random.default_rng(seed), max_support=100)
        assert 5 <= ep.ways <= 50
        assert len(ep.support) <= 100
        assert np.all(np.bincount(ep.support_labels, minlength=ep.ways) >= 1)
        assert not set(ep.support) & set(ep.query)
