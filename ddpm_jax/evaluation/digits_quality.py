"""Are the digits demo's samples readable digits? A small classifier of scikit-learn's 8×8 digits to ask it.

FID with the 2015 Inception network (evaluate.py) says how close the samples' statistics are to the data's; this
module adds a direct check: the share of samples that a simple classifier, trained on the real digits, labels with
confidence. The classifier is scikit-learn's LogisticRegression on the 8×8 pixels scaled to [0, 1], trained on a
fixed stratified split of the 1,797 digits (the rest measure its accuracy). Images of any size are box-filtered down
to 8×8 first, so a model trained at 16×16 is judged on the same 64 pixels as one trained at 8×8.

Calibration: a linear classifier's confidence depends on its regularisation. With scikit-learn's default C = 1 only
~70% of the held-out real digits reach a probability of 0.9; C = 30 brings that to ~92% at 8×8 (~87% after the
8 → 16 → 8 round trip a 16×16 model's data goes through), with the held-out accuracy unchanged (~97%). A linear
model also extrapolates: about half of all uniform-noise images get a confident label too, so read the confident
share beside FID and beside the same share of real digits at the model's resolution (--mode=eval prints all three
for a digits config: demo_report), not alone.
"""
import functools

import ml_collections
import numpy as np
from PIL import Image

SIDE = 8  # The classifier's input: the native 8×8 digits.
NUM_DIGITS = 1797  # scikit-learn's load_digits.
HELD_OUT = 0.25  # Share of the digits kept out of the classifier's training to measure its accuracy.
C = 30.0  # Inverse L2 strength: high enough that ~92% of held-out real digits are classified with p >= 0.9.


def real_digits(image_size):
  """All 1,797 digits as uint8 [N, image_size, image_size, 1], exactly as the input pipeline serves them."""
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top  # keep the import of this module light
  data = ml_collections.ConfigDict(dict(source="digits", image_size=image_size, channels=1))
  source = input_pipeline.make_source(data)
  return np.stack([source[i] for i in range(len(source))])


def real_subset(num, seed, image_size=SIDE):
  """`num` distinct real digits, uint8 [num, image_size, image_size, 1], a fixed random choice for `seed`."""
  if not 0 < num <= NUM_DIGITS:
    raise ValueError(f"num must be in 1..{NUM_DIGITS}, got {num}")
  index = np.sort(np.random.default_rng(seed).choice(NUM_DIGITS, num, replace=False))
  return real_digits(image_size)[index]


def labels():
  """The digits' classes [1797], in the order of real_digits."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  return load_digits().target


def split(seed=0):
  """(train, held_out) index arrays: a stratified split of the 1,797 digits, fixed by seed."""
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  return train_test_split(np.arange(NUM_DIGITS), test_size=HELD_OUT, random_state=seed, stratify=labels())


def to_features(images_uint8):
  """uint8 [N, H, W, 1] (or [N, H, W]) images of any size → float64 [N, 64]: box-filtered to 8×8, scaled to 0…1."""
  images = np.asarray(images_uint8)
  if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 1):
    raise ValueError(f"need uint8 grayscale images [N, H, W, 1], got {images.dtype} {images.shape}")
  images = images.reshape(images.shape[:3]).astype(np.float32)
  if images.shape[1:] != (SIDE, SIDE):
    # Area averaging in float ('F' mode): no rounding; a 16×16 image becomes the means of its 2×2 blocks.
    images = np.stack([np.asarray(Image.fromarray(a).resize((SIDE, SIDE), Image.BOX)) for a in images])
  return images.reshape(len(images), SIDE * SIDE).astype(np.float64) / 255.0


@functools.lru_cache(maxsize=None)  # ~2 s each; a sweep asks once per point. Callers only read it.
def fit_classifier(seed=0):
  """(classifier, held_out_accuracy): LogisticRegression on the training part of split(seed) at 8×8."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  train, held_out = split(seed)
  x, y = to_features(real_digits(SIDE)), labels()
  classifier = LogisticRegression(C=C, max_iter=10_000).fit(x[train], y[train])
  return classifier, float(np.mean(classifier.predict(x[held_out]) == y[held_out]))


def probabilities(classifier, images_uint8):
  """Class probabilities [N, 10] of uint8 images [N, H, W, 1] of any size."""
  return classifier.predict_proba(to_features(images_uint8))


def predicted_labels(classifier, images_uint8):
  """Most probable digit [N] of uint8 images [N, H, W, 1] of any size."""
  return classifier.classes_[np.argmax(probabilities(classifier, images_uint8), axis=1)]


def confident_share(classifier, images_uint8, threshold=0.9):
  """Share of images whose most probable digit has probability >= threshold (a float in [0, 1])."""
  return float(np.mean(np.max(probabilities(classifier, images_uint8), axis=1) >= threshold))


# The demo's goals: near the real digits in FID, and readable.
FID_FACTOR = 2.0  # FID of the samples ≤ FID_FACTOR × the floor (the same number of real digits).
CONFIDENT_TARGET = 0.8  # Share of samples the classifier reads with p ≥ 0.9.
LABEL_TARGET = 0.95  # A conditional model's share of samples read as the digit asked for.


def demo_report(samples, fid_value, feature_fn, batch_size, ref_mu, ref_sigma, *, seed=0, labels=None):
  """--mode=eval's extra numbers for the digits demo, from its uint8 samples [N, H, W, 1] and their FID; for a
  class-conditional model (labels: the digit asked for of each sample), also the share read as that digit.

  The floor is the FID of N real digits (real_subset, at the samples' size) against the same reference: what a
  perfect model scores with so few samples, FID being biased upwards at small N. The reference is the training set
  itself, so copies of training digits would score well: the share of samples that are copies (memorization.py) is
  reported beside the same share among the real digits.
  """
  from ddpm_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
  from ddpm_jax.evaluation import memorization  # pylint: disable=g-import-not-at-top
  all_real = real_digits(samples.shape[1])
  real = real_subset(len(samples), seed, samples.shape[1])
  floor = fid.fid_from_features(fid.compute_features(feature_fn, [real], batch_size)["pool_3"], ref_mu, ref_sigma)
  classifier, accuracy = fit_classifier(seed)
  predicted = predicted_labels(classifier, samples)
  report = dict(num_samples=len(samples), fid=fid_value, floor_fid=floor, fid_over_floor=fid_value / floor,
                confident_share=confident_share(classifier, samples),
                real_confident_share=confident_share(classifier, real),
                classifier_accuracy=accuracy, predicted_counts=np.bincount(predicted, minlength=10).tolist(),
                copy_share=memorization.copy_share(samples, all_real),
                real_copy_share=memorization.copy_share(all_real, all_real, leave_one_out=True))
  if labels is not None:
    report["label_share"] = float(np.mean(predicted == np.asarray(labels)))
  return report


def report_lines(r):
  """demo_report's numbers as a small Markdown table against the demo's goals."""
  n, goal = r["num_samples"], FID_FACTOR * r["floor_fid"]
  met = lambda ok: "yes" if ok else "NO"
  return [
      "| digits demo | samples | real digits | goal | met |",
      "|---|---|---|---|---|",
      f"| FID against all 1,797 digits | {r['fid']:.2f} | {r['floor_fid']:.2f} ({n} real: the floor) | ≤ "
      f"{FID_FACTOR:g} × floor = {goal:.2f} | {met(r['fid'] <= goal)} ({r['fid_over_floor']:.2f} × floor) |",
      f"| read as a digit with p ≥ 0.9 | {r['confident_share']:.1%} | {r['real_confident_share']:.1%} | ≥ "
      f"{CONFIDENT_TARGET:.0%} | {met(r['confident_share'] >= CONFIDENT_TARGET)} |",
      f"| classifier's held-out accuracy | | {r['classifier_accuracy']:.1%} | | |",
      f"| copies of a training digit (nearest ≥ 3× closer than the next) | {r['copy_share']:.1%} | "
      f"{r['real_copy_share']:.1%} (each against the others) | | |",
      f"| samples per predicted digit 0-9 | {r['predicted_counts']} | | | |",
  ] + ([f"| read as the digit asked for (conditional) | {r['label_share']:.1%} | "
        f"{r['classifier_accuracy']:.1%} (held out) | ≥ {LABEL_TARGET:.0%} | {met(r['label_share'] >= LABEL_TARGET)} |"]
       if "label_share" in r else [])
