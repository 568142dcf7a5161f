"""The nearest-neighbour ratio test against distances worked out by hand."""
import numpy as np
import pytest

from ddpm_jax.evaluation import memorization


def test_ratios_are_nearest_over_second_nearest():
  references = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 10.0]])
  queries = np.array([[0.0, 0.0],    # a copy of the first: 0 / 3
                      [1.0, 0.0],    # 1 from the first, 2 from the second: 1 / 2
                      [1.5, 0.0],    # halfway between the first two: 1
                      [0.0, 9.0]])   # 1 from the third, 9 from the first: 1 / 9
  np.testing.assert_allclose(memorization.nearest_ratios(queries, references), [0.0, 0.5, 1.0, 1 / 9], atol=1e-12)
  assert memorization.copy_share(queries, references) == 0.5  # the exact copy and the 1/9


def test_any_image_shape_and_dtype_compare_as_pixels():
  references = np.zeros((3, 2, 2, 1), np.uint8)
  references[1, 0, 0, 0], references[2, 1, 1, 0] = 30, 200
  query = references[1:2].copy()
  query[0, 1, 0, 0] = 4  # 4 from the second reference, √(30² + 4²) from the first
  assert memorization.nearest_ratios(query, references)[0] == pytest.approx(4 / np.hypot(30, 4))


def test_leave_one_out_skips_each_image_itself():
  references = np.array([[0.0], [1.0], [1.0], [5.0]])
  # 0: nearest 1 and 1 → ratio 1; each 1: the other 1 at 0 → a copy; 5: 4 then 4 → 1.
  np.testing.assert_allclose(memorization.nearest_ratios(references, references, leave_one_out=True), [1, 0, 0, 1])
  assert memorization.copy_share(references, references, leave_one_out=True) == 0.5
  # Without leaving out, every image finds itself.
  assert memorization.copy_share(references, references) == 1.0


def test_bad_inputs_are_refused_with_the_fix():
  with pytest.raises(ValueError, match="resize them alike"):
    memorization.nearest_ratios(np.zeros((2, 4)), np.zeros((3, 9)))
  with pytest.raises(ValueError, match="at least 2 references"):
    memorization.nearest_ratios(np.zeros((2, 4)), np.zeros((1, 4)))
  with pytest.raises(ValueError, match="queries to be the references"):
    memorization.nearest_ratios(np.zeros((2, 4)), np.zeros((3, 4)), leave_one_out=True)
