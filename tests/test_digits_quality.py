"""The digits classifier behind --mode=eval's demo report: it must tell real digits from noise, at 8×8 and 16×16."""
import numpy as np
import pytest

from ddpm_jax.evaluation import digits_quality


@pytest.fixture(scope="module")
def fitted():
  return digits_quality.fit_classifier(seed=0)


def test_held_out_real_digits_are_classified_accurately_and_confidently(fitted):
  classifier, accuracy = fitted
  _, held_out = digits_quality.split(seed=0)
  real = digits_quality.real_digits(8)[held_out]
  assert accuracy > 0.95
  assert np.mean(digits_quality.predicted_labels(classifier, real) == digits_quality.labels()[held_out]) == accuracy
  assert digits_quality.confident_share(classifier, real) > 0.9


def test_the_split_is_fixed_stratified_and_disjoint():
  train, held_out = digits_quality.split(seed=0)
  again, _ = digits_quality.split(seed=0)
  other, _ = digits_quality.split(seed=1)
  np.testing.assert_array_equal(train, again)
  assert not np.array_equal(np.sort(train), np.sort(other))
  assert len(np.intersect1d(train, held_out)) == 0 and len(train) + len(held_out) == digits_quality.NUM_DIGITS
  assert np.bincount(digits_quality.labels()[held_out]).min() >= 40  # every digit held out (~45 each)


def test_digits_at_16x16_are_box_filtered_back_and_keep_their_labels(fitted):
  classifier, accuracy = fitted
  _, held_out = digits_quality.split(seed=0)
  small, large = digits_quality.real_digits(8)[held_out], digits_quality.real_digits(16)[held_out]
  assert large.shape[1:] == (16, 16, 1)
  np.testing.assert_array_equal(digits_quality.to_features(small), small.reshape(len(small), 64) / 255.0)
  same = np.mean(digits_quality.predicted_labels(classifier, large) == digits_quality.predicted_labels(classifier,
                                                                                                     small))
  assert same > 0.95
  # The 8 → 16 (bilinear) → 8 (box) round trip blurs a little: a few points of confidence, not more.
  share_small, share_large = (digits_quality.confident_share(classifier, x) for x in (small, large))
  assert share_large > 0.8 and share_small - share_large < 0.1


def test_blank_and_noise_images_are_not_confident_digits(fitted):
  classifier, _ = fitted
  rng = np.random.default_rng(0)
  real_share = digits_quality.confident_share(classifier, digits_quality.real_digits(16))
  for side in (8, 16):
    assert digits_quality.confident_share(classifier, np.zeros((8, side, side, 1), np.uint8)) == 0.0
    noise = rng.integers(0, 256, (512, side, side, 1), dtype=np.uint8)
    # A linear model extrapolates, so some noise gets a confident label; far fewer than the real digits.
    assert digits_quality.confident_share(classifier, noise) < 0.65 < real_share
  # So do about half of real digits with their pixels scrambled: the share is a check beside FID, not instead of it.
  real = digits_quality.real_digits(8)[:512].reshape(512, 64)
  scrambled = np.stack([rng.permutation(x) for x in real]).reshape(512, 8, 8, 1)
  assert digits_quality.confident_share(classifier, scrambled) < 0.65


def test_real_subset_is_fixed_distinct_and_at_the_pipeline_size():
  a, b = digits_quality.real_subset(64, seed=3, image_size=16), digits_quality.real_subset(64, seed=3, image_size=16)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.uint8 and a.shape == (64, 16, 16, 1)
  assert len({x.tobytes() for x in digits_quality.real_subset(256, seed=0)}) > 250  # a few digits are duplicates
  assert not np.array_equal(digits_quality.real_subset(64, seed=4, image_size=16), a)
  with pytest.raises(ValueError):
    digits_quality.real_subset(0, seed=0)
  with pytest.raises(ValueError):
    digits_quality.to_features(np.zeros((2, 8, 8, 3), np.uint8))
