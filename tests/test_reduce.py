from __future__ import annotations

import numpy as np
import pytest

from histosearch.archive.reduce import CoVSelector, PCAReducer, load_reducer, save_reducer


def test_cov_keeps_the_most_variable_features():
    features = np.array(
        [
            [1.0, 10.0, 0.0, 2.0],
            [1.0, 12.0, 0.0, 6.0],
            [1.0, 8.0, 0.0, 1.0],
            [1.0, 10.0, 0.0, 3.0],
        ]
    )
    # cov: f0 = 0 (constant), f1 = 1.41/10, f2 = dead (0), f3 = 1.87/3
    selector = CoVSelector(2).fit(features)
    assert selector.indices.tolist() == [1, 3]
    assert selector.transform(features).tolist() == features[:, [1, 3]].tolist()
    with pytest.raises(ValueError, match="cannot keep 5 of 4"):
        CoVSelector(5).fit(features)


@pytest.mark.parametrize("reducer", [CoVSelector(3), PCAReducer(3)])
def test_saved_reducers_transform_the_same(tmp_path, reducer):
    features = np.abs(np.random.default_rng(0).normal(size=(50, 8)))
    reducer.fit(features)
    save_reducer(reducer, tmp_path / "reducer.npz")
    loaded = load_reducer(tmp_path / "reducer.npz")
    assert type(loaded) is type(reducer)
    assert np.allclose(loaded.transform(features), reducer.transform(features))


def test_pca_captures_the_main_direction():
    rng = np.random.default_rng(1)
    direction = np.array([3.0, 4.0]) / 5
    features = rng.normal(size=(200, 1)) * 10 * direction + rng.normal(size=(200, 2)) * 0.1
    pca = PCAReducer(1).fit(features)
    assert abs(abs(pca.components[0] @ direction) - 1) < 1e-3
