"""Does a model copy its training images? The nearest-neighbour ratio test, in pixel space.

A model trained for many epochs on a small dataset can learn to reproduce its training images; FID against that
same training set then rewards copying. The test (as used by Yoon et al. 2023, "Diffusion probabilistic models
generalize when they fail to memorize"): a sample is a copy when its nearest training image is more than three times
closer, in L2 over the pixels, than its second nearest. Compare the share of copies among samples with the same
share among the training images themselves, each measured against the others (leave one out), since a dataset may
hold near-duplicates of its own.
"""
import numpy as np

COPY_RATIO = 1 / 3  # d(nearest) / d(second nearest) below this marks a copy.


def _flat(images):
  images = np.asarray(images)
  if images.ndim < 2 or len(images) == 0:
    raise ValueError(f"need a batch of images [N, ...], got shape {images.shape}")
  return images.reshape(len(images), -1).astype(np.float64)


def nearest_ratios(queries, references, *, leave_one_out=False):
  """d1 / d2 [N] for each query: its L2 distance to the nearest reference over that to the second nearest.

  queries [N, ...] and references [M, ...] hold images of one shape (any dtype: compared as float64, so pass both
  in one scale). leave_one_out=True: the queries are the references themselves, and each is left out of its own
  search. A query equal to its nearest reference has ratio 0; one equally far from two references, ratio 1.
  """
  q, r = _flat(queries), _flat(references)
  if q.shape[1] != r.shape[1]:
    raise ValueError(f"queries have {q.shape[1]} values each and references {r.shape[1]}: resize them alike")
  if len(r) < 2 + leave_one_out:
    raise ValueError(f"need at least {2 + leave_one_out} references for a nearest and a second nearest, got {len(r)}")
  # |q - r|² = |q|² - 2 q·r + |r|², clipped at 0 against rounding; sqrt only of the two kept per row.
  squared = np.maximum((q * q).sum(1)[:, None] - 2.0 * q @ r.T + (r * r).sum(1)[None, :], 0.0)
  if leave_one_out:
    if len(q) != len(r):
      raise ValueError(f"leave_one_out needs the queries to be the references, got {len(q)} and {len(r)} images")
    np.fill_diagonal(squared, np.inf)
  two = np.sqrt(np.partition(squared, 1, axis=1)[:, :2])
  # d2 = 0 means d1 = 0 too: a query equal to two references is a copy (ratio 0).
  return np.divide(two[:, 0], two[:, 1], out=np.zeros(len(two)), where=two[:, 1] > 0)


def copy_share(queries, references, *, leave_one_out=False):
  """Share of queries whose nearest_ratios is below COPY_RATIO (a float in [0, 1])."""
  return float(np.mean(nearest_ratios(queries, references, leave_one_out=leave_one_out) < COPY_RATIO))
