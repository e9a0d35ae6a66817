"""K-means in JAX: recovers separated blobs, deterministic, sharded == unsharded, clear errors."""

import chex
import numpy as np
import pytest

from ideal_jax import sharding
from ideal_jax.daar import kmeans
from ideal_jax.utils.errors import InputError


def blobs(n_per: int, k: int, d: int, seed: int, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    centers_kd = rng.normal(size=(k, d)) * 3.0
    x_nd = np.concatenate([c + spread * rng.normal(size=(n_per, d)) for c in centers_kd])
    truth_n = np.repeat(np.arange(k), n_per)
    return x_nd.astype(np.float32), truth_n, centers_kd


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_recovers_blobs_from_perturbed_centroids(metric):
    x_nd, truth_n, centers_kd = blobs(50, 4, 16, seed=0)
    init_kd = centers_kd + np.random.default_rng(1).normal(size=centers_kd.shape)
    result = kmeans.kmeans(x_nd, init_kd, metric=metric)
    assert result.converged and result.iterations <= 10
    # Initialized at the centroids: cluster k is blob k (no label permutation).
    np.testing.assert_array_equal(result.labels_n, truth_n)
    again = kmeans.kmeans(x_nd, init_kd, metric=metric)
    np.testing.assert_array_equal(again.labels_n, result.labels_n)
    chex.assert_trees_all_equal(again.centers_kd, result.centers_kd)


def test_sharded_over_mesh_matches_single_device():
    x_nd, _, centers_kd = blobs(13, 3, 8, seed=2, spread=2.0)  # 39 rows: padded to 40 on 8 devices
    mesh = sharding.make_mesh()
    for metric in kmeans.METRICS:
        plain = kmeans.kmeans(x_nd, centers_kd, metric=metric)
        sharded = kmeans.kmeans(x_nd, centers_kd, metric=metric, mesh=mesh)
        np.testing.assert_array_equal(sharded.labels_n, plain.labels_n)
        np.testing.assert_allclose(sharded.centers_kd, plain.centers_kd, rtol=1e-5, atol=1e-6)
        assert sharded.iterations == plain.iterations


def test_empty_cluster_keeps_its_centre():
    x_nd, _, centers_kd = blobs(20, 2, 4, seed=3)
    far_kd = np.concatenate([centers_kd, np.full((1, 4), 100.0)])  # attracts nothing
    result = kmeans.kmeans(x_nd, far_kd, metric="euclidean")
    assert not np.any(result.labels_n == 2)
    np.testing.assert_allclose(result.centers_kd[2], far_kd[2])


def test_probe_set_smaller_than_k_is_a_clear_error():
    with pytest.raises(InputError, match="probe set has 2 examples but K = 3"):
        kmeans.kmeans(np.zeros((2, 4)), np.eye(3, 4))
