"""FID (TTUR's definition) and Inception Score (OpenAI's) from Inception features, plus stats files.

FID = |μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½ over pool_3 features; IS = exp E_x KL(p(y|x) ‖ p(y)) over the
1008-way logits, averaged over 10 splits. Statistics are float64 NumPy; stats files are `.npz` with `mu` [2048] and
`sigma` [2048, 2048], the layout of TTUR's precomputed files (e.g. fid_stats_cifar10_train.npz), which load as is.
"""
import io
import zipfile

import numpy as np
import scipy.special

from ddpm_jax import errors
from ddpm_jax import fileio

FEATURE_DIM = 2048


def stats_from_features(features):
  """Mean [D] and unbiased covariance [D, D] (float64, as TTUR's np.cov) of features [N, D]."""
  f = np.asarray(features, dtype=np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(sigma):
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu [D], sigma [D, D]. Returns a float.

  tr (Σ1 Σ2)^½ is computed as Σ √λ of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½, which has the same eigenvalues as Σ1 Σ2.
  TTUR's scipy.linalg.sqrtm of the non-symmetric product can come out complex or non-finite when Σ is singular (fewer
  samples than dimensions), hence its eps retry and imaginary-part check; symmetric eigendecompositions stay real and
  need only rounding-level negative eigenvalues clipped to 0."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
  if not all(np.all(np.isfinite(a)) for a in (mu1, mu2, sigma1, sigma2)):
    raise ValueError("statistics contain NaN or inf")
  root1 = _psd_sqrt(sigma1)
  return _distance(mu1, np.trace(sigma1), root1 @ sigma2 @ root1, mu2, sigma2)


def fid_from_features(features, mu2, sigma2):
  """frechet_distance(*stats_from_features(features), mu2, sigma2), in O(N·D²) rather than O(D³) for N < D.

  With N < D samples, Σ1 = Xᵀ X (X the centred features / √(N − 1), [N, D]) has rank < N, and the nonzero
  eigenvalues of Σ1 Σ2 are those of the N×N matrix X Σ2 Xᵀ: no 2048² eigendecomposition (about 2 s on 2 CPU
  cores) for a few hundred samples, as FID during training and the sweeps use. N ≥ D takes the usual route.
  """
  f = np.asarray(features, dtype=np.float64)
  mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
  n, d = f.shape
  if n >= d:
    return frechet_distance(*stats_from_features(f), mu2, sigma2)
  if mu2.shape != (d,) or sigma2.shape != (d, d):
    raise ValueError(f"shape mismatch: features [{n}, {d}]; reference mu {mu2.shape}, sigma {sigma2.shape}")
  if not all(np.all(np.isfinite(a)) for a in (f, mu2, sigma2)):
    raise ValueError("features or statistics contain NaN or inf")
  mu1 = f.mean(axis=0)
  x = (f - mu1) / np.sqrt(n - 1)
  return _distance(mu1, np.sum(x * x), x @ sigma2 @ x.T, mu2, sigma2)


def _distance(mu1, trace1, inner, mu2, sigma2):
  # inner: a symmetric PSD matrix with the nonzero eigenvalues of Σ1 Σ2, so tr (Σ1 Σ2)^½ = Σ √λ.
  eig = np.linalg.eigvalsh((inner + inner.T) / 2)
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + trace1 + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits, splits=10):
  """(mean, std) over `splits` equal parts of exp(mean_x KL(p(y|x) ‖ p(y))), p = softmax of logits [N, 1008].

  Splits are rows [i·N//splits, (i+1)·N//splits) and the std is NumPy's (ddof 0), as in OpenAI's code; the softmax is
  taken in float64 log space so confident predictions give 0·log 0 = 0 rather than NaN."""
  logits = np.asarray(logits, np.float64)
  n = logits.shape[0]
  if logits.ndim != 2 or n < splits:
    raise ValueError(f"need logits [N >= splits={splits}, classes], got shape {logits.shape}")
  log_p = scipy.special.log_softmax(logits, axis=1)
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])
    kl = np.sum(np.exp(part) * (part - log_marginal[None, :]), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


def save_stats(path, mu, sigma):
  """Writes mu [D], sigma [D, D] as float64 to `path` exactly (an .npz in TTUR's layout)."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f"{path}: need mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
  fileio.save_npz(path, mu=mu, sigma=sigma)  # exactly `path` (NumPy would append '.npz' to a name without it)


def load_stats(path, dim=FEATURE_DIM):
  """(mu [dim], sigma [dim, dim]) float64 from an .npz with keys mu and sigma (ours or TTUR's)."""
  want = f"expected mu {(dim,)} and sigma {(dim, dim)}"
  if not fileio.exists(path):
    raise FileNotFoundError(f"{path}: no such stats file")
  try:
    with np.load(io.BytesIO(fileio.read_bytes(path)), allow_pickle=False) as z:  # local or gs://
      arrays = {k: z[k] for k in ("mu", "sigma") if k in z.files}
      keys = sorted(z.files)
  except (OSError, EOFError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable .npz stats file ({errors.first_line(e)}); {want}") from None
  if len(arrays) != 2:
    raise ValueError(f"{path}: has keys {keys}; {want} under the keys 'mu' and 'sigma'")
  mu, sigma = arrays["mu"], arrays["sigma"]
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise ValueError(f"{path}: mu {mu.shape}, sigma {sigma.shape}; {want}")
  return mu.astype(np.float64), sigma.astype(np.float64)


def _rebatch(images_iterable, batch_size):
  """Fixed-size batches [batch_size, H, W, C] (the last zero-padded) and their real sizes from arrays of images."""
  pending, count = [], 0
  for arr in images_iterable:
    arr = np.asarray(arr)
    if arr.ndim == 3:
      arr = arr[None]
    while arr.shape[0]:
      take = min(batch_size - count, arr.shape[0])
      pending.append(arr[:take])
      count += take
      arr = arr[take:]
      if count == batch_size:
        yield np.concatenate(pending), batch_size
        pending, count = [], 0
  if count:
    batch = np.concatenate(pending)
    pad = np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)
    # Padding keeps one shape, so the jitted network compiles once.
    yield np.concatenate([batch, pad]), count


def compute_features(feature_fn, images_iterable, batch_size):
  """Runs feature_fn over images ([H, W, C] or [b, H, W, C] arrays, streamed) in batches of batch_size.

  Returns {name: [N, ...] float32 array} for every output of feature_fn (pool_3, and logits if present)."""
  out, previous = {}, None
  def collect(result, n):
    for k, v in result.items():
      out.setdefault(k, []).append(np.asarray(v)[:n])
  for batch, n in _rebatch(images_iterable, batch_size):
    result = feature_fn(batch)  # dispatched asynchronously: the host pulls the previous batch meanwhile
    if previous is not None:
      collect(*previous)
    previous = (result, n)
  if previous is None:
    raise ValueError("no images to compute features of")
  collect(*previous)
  return {k: np.concatenate(v) for k, v in out.items()}
