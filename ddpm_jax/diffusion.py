"""The Gaussian diffusion of DDPM (Ho, Jain, Abbeel 2020) as pure functions over arrays.

Timesteps are 0-indexed everywhere: t ∈ {0, …, T−1}, where index t is the paper's t + 1. So x_t here is the
sample after t + 1 noising steps, `betas[0]` is the paper's β_1 and the reverse chain runs t = T−1, …, 0.

Names follow the authors' `diffusion_utils_2.py` so DDPM users recognise them. Per-timestep constants are computed
in float64 with NumPy and stored as float32 arrays; a `GaussianDiffusion` is a pytree (a flax.struct dataclass),
so it passes through `jit`, `pmap` and `lax.scan`. Images are NHWC (any rank ≥ 1 works: reductions are over all
non-batch axes).
"""
import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

MEAN_TYPES = ("eps", "xstart", "xprev", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
BETA_SCHEDULES = ("linear", "quad", "const", "jsd", "cosine")


def get_beta_schedule(name, *, beta_start=1e-4, beta_end=0.02, num_timesteps=1000):
  """β_1 … β_T as a float64 NumPy array of shape [num_timesteps]."""
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}; the paper uses 1000.")
  if name == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name == "quad":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
  elif name == "const":
    betas = np.full(num_timesteps, beta_end, dtype=np.float64)
  elif name == "jsd":  # 1/T, 1/(T−1), …, 1: the Sohl-Dickstein et al. schedule.
    betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
  elif name == "cosine":  # Improved DDPM (Nichol & Dhariwal 2021), s = 0.008, β capped at 0.999.
    s = 0.008
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
  else:
    raise ValueError(f"Unknown beta schedule {name!r}; choose one of {BETA_SCHEDULES}.")
  if not (np.all(betas > 0) and np.all(betas <= 1)):
    raise ValueError(f"Betas of schedule {name!r} must lie in (0, 1]; check beta_start and beta_end.")
  return betas


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
  # The tanh approximation the authors (and PixelCNN++) use; kept so likelihoods match theirs.
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)); elementwise, nats."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  # The edge bins take the whole tail below −1 and above 1.
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x):
  """Mean over all axes but the first: [B, ...] → [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _bcast(a, t, x):
  """a[t] shaped [B, 1, …, 1] to broadcast against x of shape [B, …] (rank kept equal on purpose)."""
  return a[t].reshape((t.shape[0],) + (1,) * (x.ndim - 1)).astype(x.dtype)


# Not frozen (sampling.py retypes a copy's model_mean_type) and compared by identity (eq=False): the sampler tests
# hash a diffusion as a static jit argument, which field-wise hashing of arrays would refuse.
@flax.struct.dataclass(frozen=False, eq=False, repr=False)
class GaussianDiffusion:
  """Forward process q, reverse-process parameterisation p, losses and likelihood of one diffusion.

  Build it as GaussianDiffusion(betas, model_mean_type, model_var_type, loss_type); the per-timestep tables after
  the `_` marker are computed from the betas (they are fields only so that JAX can rebuild the pytree).

  model_mean_type: what the network predicts — 'eps' (ε, the paper), 'xstart' (x0), 'xprev' (μ̃ directly) or 'v'
  (√ᾱ ε − √(1 − ᾱ) x0, Salimans & Ho 2022: the distilled students of modes/distill.py).
  model_var_type: 'fixedlarge' (σ² = β_t, with t = 0 using β̃_1 like the authors), 'fixedsmall' (σ² = β̃_t),
    'learned' (the network also outputs log σ²) or 'learned_range' (improved DDPM: it outputs v ∈ [-1, 1]
    interpolating log β̃_t … log β_t).
  loss_type: 'mse' (L_simple on the predicted quantity), 'kl' (the true VLB term L_t, in bits/dim) or 'hybrid'
    (mse + VLB term with the mean's gradient stopped, scaled by T/1000, for learned variances).
  """

  betas: Any
  model_mean_type: str = flax.struct.field(pytree_node=False, default="eps")
  model_var_type: str = flax.struct.field(pytree_node=False, default="fixedlarge")
  loss_type: str = flax.struct.field(pytree_node=False, default="mse")
  _: dataclasses.KW_ONLY
  alphas_cumprod: Any = None
  alphas_cumprod_prev: Any = None
  sqrt_alphas_cumprod: Any = None
  one_minus_alphas_cumprod: Any = None
  sqrt_one_minus_alphas_cumprod: Any = None
  log_one_minus_alphas_cumprod: Any = None
  sqrt_recip_alphas_cumprod: Any = None
  sqrt_recipm1_alphas_cumprod: Any = None
  posterior_variance: Any = None
  posterior_log_variance_clipped: Any = None
  posterior_mean_coef1: Any = None
  posterior_mean_coef2: Any = None
  fixedlarge_variance: Any = None
  fixedlarge_log_variance: Any = None

  def __post_init__(self):
    if self.alphas_cumprod is not None or self.betas is None:  # JAX rebuilding a tree (unflatten, tree.map, replace)
      return
    for value, allowed, field in ((self.model_mean_type, MEAN_TYPES, "model_mean_type"),
                                  (self.model_var_type, VAR_TYPES, "model_var_type"),
                                  (self.loss_type, LOSS_TYPES, "loss_type")):
      if value not in allowed:
        raise ValueError(f"Unknown diffusion.{field} {value!r}; choose one of {allowed}.")
    if self.loss_type == "mse" and self.learns_variance:
      raise ValueError("loss_type='mse' cannot train a learned variance; use loss_type='kl' or 'hybrid'.")
    if self.loss_type == "hybrid" and not self.learns_variance:
      raise ValueError("loss_type='hybrid' needs a learned variance; set model_var_type='learned' or "
                       "'learned_range', or use loss_type='mse'.")

    b = np.asarray(self.betas, dtype=np.float64)
    if b.ndim != 1 or not (np.all(b > 0) and np.all(b <= 1)):
      raise ValueError("betas must be a 1-D array with values in (0, 1]; build it with get_beta_schedule.")
    ac = np.cumprod(1.0 - b)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = b * (1.0 - ac_prev) / (1.0 - ac)
    # β̃_0 = 0, so its log is clipped to β̃_1 (the authors' choice); fixed-large does the same at t = 0.
    post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.log(b)
    large_var = np.append(post_var[1], b[1:]) if len(b) > 1 else b
    consts = dict(
        betas=b, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, sqrt_alphas_cumprod=np.sqrt(ac),
        one_minus_alphas_cumprod=1.0 - ac, sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        log_one_minus_alphas_cumprod=np.log(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_variance=post_var, posterior_log_variance_clipped=post_logvar,
        posterior_mean_coef1=b * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        fixedlarge_variance=large_var, fixedlarge_log_variance=np.log(large_var))
    for name, value in consts.items():
      setattr(self, name, jnp.asarray(value, dtype=jnp.float32))

  @classmethod
  def from_config(cls, diffusion_config):
    """Builds the diffusion described by a config's `diffusion` group."""
    c = diffusion_config
    betas = get_beta_schedule(c.beta_schedule, beta_start=c.beta_start, beta_end=c.beta_end,
                              num_timesteps=c.num_timesteps)
    return cls(betas, c.model_mean_type, c.model_var_type, c.loss_type)

  @property
  def num_timesteps(self):
    return self.betas.shape[0]

  @property
  def learns_variance(self):
    return self.model_var_type in ("learned", "learned_range")

  # ---- forward process q ----
  def q_mean_variance(self, x_start, t):
    """Mean, variance and log-variance of q(x_t | x_0)."""
    mean = _bcast(self.sqrt_alphas_cumprod, t, x_start) * x_start
    # 1 − ᾱ_t comes from float64: in float32 it would lose ~4 digits at t = 0.
    return (mean, _bcast(self.one_minus_alphas_cumprod, t, x_start),
            _bcast(self.log_one_minus_alphas_cumprod, t, x_start))

  def q_sample(self, x_start, t, noise):
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε: a draw from q(x_t | x_0)."""
    return (_bcast(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _bcast(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """Mean, variance and clipped log-variance of the posterior q(x_{t−1} | x_t, x_0)."""
    mean = (_bcast(self.posterior_mean_coef1, t, x_t) * x_start
            + _bcast(self.posterior_mean_coef2, t, x_t) * x_t)
    return (mean, _bcast(self.posterior_variance, t, x_t),
            _bcast(self.posterior_log_variance_clipped, t, x_t))

  def predict_start_from_noise(self, x_t, t, noise):
    """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t."""
    return (_bcast(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _bcast(self.sqrt_recipm1_alphas_cumprod, t, x_t) * noise)

  def predict_start_from_prev(self, x_t, t, x_prev):
    """The x_0 whose posterior mean given x_t is x_prev."""
    return (x_prev - _bcast(self.posterior_mean_coef2, t, x_t) * x_t) / _bcast(self.posterior_mean_coef1, t, x_t)

  def predict_start(self, x_t, t, out):
    """x̂_0 from the mean part of a network output, whatever model_mean_type it predicts."""
    if self.model_mean_type == "eps":
      return self.predict_start_from_noise(x_t, t, out)
    if self.model_mean_type == "xstart":
      return out
    if self.model_mean_type == "v":  # x0 = √ᾱ x_t − √(1 − ᾱ) v
      return _bcast(self.sqrt_alphas_cumprod, t, x_t) * x_t - _bcast(self.sqrt_one_minus_alphas_cumprod, t, x_t) * out
    return self.predict_start_from_prev(x_t, t, out)

  # ---- reverse process p ----
  def split_model_output(self, model_output):
    """(mean part, variance part or None): a learned-variance network outputs 2C channels, mean part first."""
    if not self.learns_variance:
      return model_output, None
    return jnp.split(model_output, 2, axis=-1)

  def p_mean_variance(self, model_output, x_t, t, clip_denoised=True):
    """Mean, variance, log-variance of p(x_{t−1} | x_t) and the predicted x_0, from the network output."""
    out, var_out = self.split_model_output(model_output)
    if self.model_var_type == "learned":
      log_variance = var_out
    elif self.model_var_type == "learned_range":
      frac = (var_out + 1.0) / 2.0
      log_variance = (frac * _bcast(jnp.log(self.betas), t, x_t)
                      + (1.0 - frac) * _bcast(self.posterior_log_variance_clipped, t, x_t))
    elif self.model_var_type == "fixedlarge":
      log_variance = jnp.broadcast_to(_bcast(self.fixedlarge_log_variance, t, x_t), x_t.shape)
    else:
      log_variance = jnp.broadcast_to(_bcast(self.posterior_log_variance_clipped, t, x_t), x_t.shape)

    maybe_clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_denoised else (lambda x: x)
    if self.model_mean_type == "xprev":
      pred_xstart = maybe_clip(self.predict_start_from_prev(x_t, t, out))
      mean = out
    else:
      pred_xstart = maybe_clip(self.predict_start(x_t, t, out))
      mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
    return dict(mean=mean, variance=jnp.exp(log_variance), log_variance=log_variance, pred_xstart=pred_xstart)

  def p_sample(self, model_output, x_t, t, noise, clip_denoised=True):
    """One ancestral step x_t → x_{t−1} (no noise where t == 0); returns (x_{t−1}, x̂_0)."""
    out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
    nonzero = (t != 0).astype(x_t.dtype).reshape((t.shape[0],) + (1,) * (x_t.ndim - 1))
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise, out["pred_xstart"]

  # ---- losses and likelihood ----
  def vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=False):
    """The VLB term L_t in bits/dim, [B]: KL(q(x_{t−1}|x_t,x_0) ‖ p) for t > 0, the decoder NLL at t = 0.

    Also returns the predicted x_0.
    """
    true_mean, _, true_logvar = self.q_posterior_mean_variance(x_start, x_t, t)
    p = self.p_mean_variance(model_output, x_t, t, clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(
        x_start, means=p["mean"], log_scales=0.5 * p["log_variance"])) / math.log(2.0)
    return jnp.where(t == 0, nll, kl), p["pred_xstart"]

  def training_losses(self, model_fn, x_start, t, noise):
    """Per-example loss [B] at timesteps t [B] with noise ε, and a dict of its terms.

    model_fn(x_t, t) → network output (C or 2C channels).
    """
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, t)
    terms = {}
    if self.loss_type == "kl":
      terms["vb"], _ = self.vb_terms_bpd(model_output, x_start, x_t, t)
      return terms["vb"], terms
    mean_out, var_out = self.split_model_output(model_output)
    if self.model_mean_type == "v":
      target = (_bcast(self.sqrt_alphas_cumprod, t, x_start) * noise
                - _bcast(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start)
    else:
      target = {"eps": noise, "xstart": x_start,
                "xprev": self.q_posterior_mean_variance(x_start, x_t, t)[0]}[self.model_mean_type]
    terms["mse"] = mean_flat(jnp.square(target - mean_out))
    loss = terms["mse"]
    if self.loss_type == "hybrid":
      # The VLB trains only the variance: the mean's gradient comes from the mse term alone.
      frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
      vb, _ = self.vb_terms_bpd(frozen, x_start, x_t, t)
      terms["vb"] = vb * (self.num_timesteps / 1000.0)
      loss = loss + terms["vb"]
    return loss, terms

  def prior_bpd(self, x_start):
    """KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim, [B]: the VLB's prior term L_T."""
    t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
    mean, _, logvar = self.q_mean_variance(x_start, t)
    return mean_flat(normal_kl(mean, logvar, jnp.zeros_like(mean), jnp.zeros_like(logvar))) / math.log(2.0)

  def calc_bpd_loop(self, model_fn, x_start, rng, clip_denoised=True):
    """The full variational bound on −log p(x_0) in bits/dim, with all T terms in one `lax.scan`.

    Returns dict: total_bpd [B], prior_bpd [B], terms_bpd [B, T] (L_t at index t), mse_bt [B, T] (x̂_0 error).
    The noise at step t is drawn from fold_in(rng, t).
    """
    batch = x_start.shape[0]

    def body(_, t_scalar):
      t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x_start.shape, x_start.dtype)
      x_t = self.q_sample(x_start, t, noise)
      vb, pred_xstart = self.vb_terms_bpd(model_fn(x_t, t), x_start, x_t, t, clip_denoised)
      return None, (vb, mean_flat(jnp.square(pred_xstart - x_start)))

    _, (vb_tb, mse_tb) = jax.lax.scan(body, None, jnp.arange(self.num_timesteps - 1, -1, -1))
    terms_bpd, mse_bt = vb_tb[::-1].T, mse_tb[::-1].T  # scan ran t = T−1 … 0; store at index t.
    prior = self.prior_bpd(x_start)
    return dict(total_bpd=jnp.sum(terms_bpd, axis=1) + prior, prior_bpd=prior, terms_bpd=terms_bpd, mse_bt=mse_bt)
