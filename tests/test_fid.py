"""FID, Inception Score, stats files and feature streaming against independent references."""
import numpy as np
import pytest
import scipy.linalg

from ddpm_jax.evaluation import fid


def _random_cov(rng, d, n):
  a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
  return np.cov(a, rowvar=False)


def _scipy_fid(mu1, s1, mu2, s2):
  """The formula as TTUR writes it, in float64 with scipy's general matrix square root."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  assert np.allclose(np.imag(covmean), 0, atol=1e-8)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def test_fid_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(0)
  # 40 samples in 64 dimensions: a singular covariance, where the sqrtm route needs its eps fallback.
  for n, d in [(2000, 64), (40, 64)]:
    mu, sigma = fid.stats_from_features(rng.normal(size=(n, d)) * 3 + 1)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6 * np.trace(sigma)


def test_fid_matches_scipy_reference():
  rng = np.random.default_rng(1)
  for d in (16, 256):
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 0.5
    s1, s2 = _random_cov(rng, d, 4 * d), _random_cov(rng, d, 4 * d)
    want = _scipy_fid(mu1, s1, mu2, s2)
    assert want > 1.0
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


def test_fid_from_features_equals_the_fid_of_their_statistics():
  # Few samples take the N×N route: against the D×D eigendecompositions of frechet_distance (scipy's sqrtm is not
  # accurate enough on a singular Σ1 to judge); from N = D on, the D×D route itself (against scipy once Σ1 is regular).
  rng = np.random.default_rng(4)
  d = 64
  mu2, s2 = rng.normal(size=d) + 0.3, _random_cov(rng, d, 4 * d)
  for n in (2, 10, 63, 64, 200):
    features = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / 8 + 0.1
    got = fid.fid_from_features(features, mu2, s2)
    mu1, s1 = fid.stats_from_features(features)
    want = fid.frechet_distance(mu1, s1, mu2, s2) if n <= d else _scipy_fid(mu1, s1, mu2, s2)
    assert want > 1.0 and got == pytest.approx(want, rel=1e-7), n
  with pytest.raises(ValueError, match="N >= 2"):
    fid.fid_from_features(np.zeros((1, d)), mu2, s2)
  with pytest.raises(ValueError, match="shape mismatch"):
    fid.fid_from_features(np.zeros((4, d)), mu2[:-1], s2)


def test_fid_closed_form_for_commuting_covariances():
  rng = np.random.default_rng(2)
  d = 32
  q = np.linalg.qr(rng.normal(size=(d, d)))[0]
  a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  # Same eigenvectors: the distance is |Δμ|² + Σ (√a − √b)².
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
  assert got == pytest.approx(want, rel=1e-10)


def test_stats_from_features():
  mu, sigma = fid.stats_from_features(np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]], np.float32))
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, [2.0, 2.0])
  np.testing.assert_allclose(sigma, [[4.0, 3.0], [3.0, 3.0]])  # unbiased (N − 1), as np.cov and TTUR


def test_inception_score_uniform_is_one():
  mean, std = fid.inception_score(np.zeros((100, 1008)), splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_distinct_classes():
  classes = 10
  labels = np.arange(1000) % classes  # every split holds every class equally often
  logits = np.zeros((1000, 1008))
  logits[np.arange(1000), labels] = 60.0
  mean, std = fid.inception_score(logits, splits=10)
  assert mean == pytest.approx(classes, rel=1e-6) and std < 1e-6


def test_inception_score_matches_openai_formula():
  rng = np.random.default_rng(3)
  logits = rng.normal(scale=3.0, size=(503, 1008))
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for i in range(7):
    part = p[i * 503 // 7:(i + 1) * 503 // 7]
    kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  mean, std = fid.inception_score(logits, splits=7)
  assert mean == pytest.approx(np.mean(scores), rel=1e-10)
  assert std == pytest.approx(np.std(scores), rel=1e-8)


def test_stats_round_trip_and_ttur_files(tmp_path):
  rng = np.random.default_rng(4)
  mu, sigma = fid.stats_from_features(rng.normal(size=(10, 2048)))
  path = tmp_path / "stats.npz"
  fid.save_stats(path, mu, sigma)
  mu2, sigma2 = fid.load_stats(path)
  assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
  # TTUR's files: the same two keys (their precision and any extra keys do not matter).
  ttur = tmp_path / "fid_stats_cifar10_train.npz"
  np.savez_compressed(ttur, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), extra=np.zeros(3))
  mu3, sigma3 = fid.load_stats(ttur)
  assert mu3.dtype == np.float64 and np.allclose(mu3, mu, atol=1e-6) and sigma3.shape == (2048, 2048)


def test_stats_bad_files(tmp_path):
  bad = tmp_path / "bad.npz"
  np.savez(bad, mu=np.zeros(2047), sigma=np.zeros((2047, 2047)))
  with pytest.raises(ValueError, match=r"bad\.npz.*\(2048,\).*\(2048, 2048\)") as info:
    fid.load_stats(bad)
  assert "\n" not in str(info.value)
  keys = tmp_path / "keys.npz"
  np.savez(keys, m=np.zeros(2048))
  with pytest.raises(ValueError, match=r"keys\.npz.*'mu' and 'sigma'"):
    fid.load_stats(keys)
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip at all")
  with pytest.raises(ValueError, match="garbage.npz"):
    fid.load_stats(garbage)
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    fid.load_stats(tmp_path / "missing.npz")
  with pytest.raises(ValueError, match="sigma"):
    fid.save_stats(tmp_path / "x.npz", np.zeros(4), np.zeros((4, 3)))


def test_compute_features_streams_fixed_batches():
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (11, 4, 4, 3), dtype=np.uint8)
  seen = []

  def feature_fn(batch):
    seen.append(batch.shape)
    flat = batch.reshape(batch.shape[0], -1).astype(np.float32)
    return {"pool_3": flat.sum(1, keepdims=True), "logits": flat[:, :2]}

  # Mixed chunk sizes, single images included; order must survive re-batching.
  stream = [images[:3], images[3], images[4:10], images[10:]]
  out = fid.compute_features(feature_fn, iter(stream), batch_size=4)
  assert set(seen) == {(4, 4, 4, 3)} and len(seen) == 3
  flat = images.reshape(11, -1).astype(np.float32)
  np.testing.assert_array_equal(out["pool_3"], flat.sum(1, keepdims=True))
  np.testing.assert_array_equal(out["logits"], flat[:, :2])
  with pytest.raises(ValueError):
    fid.compute_features(feature_fn, iter([]), batch_size=4)
