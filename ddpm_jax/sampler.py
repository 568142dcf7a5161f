"""The sampler a run uses, as one frozen value built from config.sampling: method, steps, η, order, spacing and
clipping.

Every driver (sample, eval, sweep, the FID monitor) and every evaluation function takes a `Sampler` instead of
reading config.sampling itself, so the settings, their check and the directory tag that keeps the outputs of
different samplers apart are written once. It is hashable, so it can be a static argument of compiled programs.
"""
import dataclasses
import numbers

from ddpm_jax import respacing
from ddpm_jax import sampling
from ddpm_jax import solvers


@dataclasses.dataclass(frozen=True)
class Sampler:
  # sampling.METHODS: 'ancestral' (the paper's Algorithm 2), 'ddim', 'analytic_dpm' (the ancestral chain with
  # Analytic-DPM's variances: analytic_dpm.py), or a fast solver ('dpm_solver++', 'sde_dpm_solver++', 'unipc';
  # solvers.py).
  method: str = "ancestral"
  num_steps: int = 0  # network calls per sample; 0 = all T (the paper's chain; not for the solvers)
  eta: float = 0.0  # DDIM's noise scale (DDIM only)
  clip_denoised: bool = True  # clip the predicted x̂_0 to [-1, 1] at every step (as the authors do)
  order: int = 2  # the solvers' order (1-3; 'sde_dpm_solver++' 1-2)
  spacing: str = "auto"  # timesteps: 'auto' = 'logsnr' (solvers.SPACINGS) or 'even' (chains: respacing.SPACINGS)
  # 'analytic_dpm' only: E‖ε̂‖²/d at each of the chain's timesteps, estimated from data by analytic_dpm.fit.
  gamma: tuple = ()
  # Class-conditional models: sample i's class is labels[i mod len(labels)] (() = unconditional), guided by
  # classifier-free guidance of this scale (0 = the conditional model alone).
  labels: tuple = ()
  guidance_scale: float = 0.0

  def __post_init__(self):
    if self.method not in sampling.METHODS:
      raise ValueError(f"sampling.method = {self.method!r}: unknown; choose one of {sampling.METHODS}.")
    if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, numbers.Integral) or self.num_steps < 0:
      raise ValueError(f"sampling.num_steps = {self.num_steps!r}: must be an integer >= 0 (0 = all T steps).")

  @property
  def grid_columns(self):
    """Columns of a grid of these samples: one per label cycled over (so each column is a class), else None."""
    return len(self.labels) if len(self.labels) > 1 else None

  @property
  def is_solver(self):
    return self.method in solvers.METHODS

  @classmethod
  def from_config(cls, sampling_config, num_classes=0):
    """The sampler of config.sampling for a model of num_classes classes (config.model.num_classes; 0 = none)."""
    s = sampling_config
    labels = tuple(s.labels) or tuple(range(num_classes)) if num_classes else ()  # () = every class in turn
    return cls(method=s.method, num_steps=int(s.num_steps), eta=float(s.eta), clip_denoised=bool(s.clip_denoised),
               order=int(s.order), spacing=s.spacing, labels=labels,
               guidance_scale=float(s.guidance_scale) if num_classes else 0.0)

  def steps(self, num_timesteps):
    """Network evaluations per sample: T unless respaced."""
    return self.num_steps or num_timesteps

  def timesteps(self, num_timesteps):
    """A chain's kept timesteps, increasing (respacing.chain_timesteps)."""
    if self.is_solver:
      raise ValueError(f"{self.method!r} steps between noise levels, not a respaced chain's timesteps.")
    return respacing.chain_timesteps(num_timesteps, self.steps(num_timesteps), sampling.chain_spacing(self.spacing))

  def tag(self, num_timesteps):
    """'' for the paper's chain, else e.g. '_ddim50_eta0.0': outputs of different samplers never share a directory.

    A conditional model's tag ends in its guidance scale and, unless every class is cycled over, its labels:
    '_w3.0', '_w0.0_labels3-5'.
    """
    return self._method_tag(num_timesteps) + self._label_tag()

  def _method_tag(self, num_timesteps):
    if self.method == "ancestral" and not self.num_steps:
      return ""
    if self.is_solver:  # e.g. '_dpm_solver++2_20_logsnr'
      return f"_{self.method}{self.order}_{self.num_steps}_{solvers.spacing_of(self.spacing)}"
    spacing = sampling.chain_spacing(self.spacing)
    return (f"_{self.method}{self.steps(num_timesteps)}" + (f"_eta{self.eta}" if self.method == "ddim" else "")
            + ("" if spacing == "even" else f"_{spacing}"))

  def _label_tag(self):
    if not self.labels:
      return ""
    every_class = self.labels == tuple(range(len(self.labels)))
    return f"_w{self.guidance_scale}" + ("" if every_class else "_labels" + "-".join(map(str, self.labels)))

  def chain_kwargs(self):
    """The sampler arguments of sampling.sample_loop and sampling.sample_sharded."""
    kwargs = dict(clip_denoised=self.clip_denoised, num_steps=self.num_steps or None, method=self.method, eta=self.eta)
    if self.is_solver:
      kwargs.update(order=self.order, spacing=self.spacing)
    elif sampling.chain_spacing(self.spacing) != "even":  # only then: results files of evenly spaced chains unchanged
      kwargs.update(spacing=self.spacing)
    if self.gamma:
      kwargs.update(gamma=self.gamma)
    if self.labels:
      kwargs.update(labels=self.labels, guidance_scale=self.guidance_scale)
    return kwargs
