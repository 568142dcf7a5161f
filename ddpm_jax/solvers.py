"""Fast ODE/SDE samplers (DPM-Solver++, SDE-DPM-Solver++, UniPC) as one compiled `lax.scan`; parity with diffusers.

All solvers here work in log-SNR time: with α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t) and λ_t = log α_t − log σ_t, step i goes
from timestep s = t_i to t = t_{i+1} (h = λ_t − λ_s > 0) and sees the network only through the data prediction
x̂_0 = (x_s − σ_s ε̂(x_s, s)) / α_s (notation of Lu et al. 2022b). The chain's last step goes to σ = 0 (diffusers'
`final_sigmas_type='zero'`): it is first order and returns the last x̂_0 itself.

A multistep method combines the current x̂_0 with those of the previous steps. Which order a step uses is fixed by
its index (warm-up at the start, lower orders at the end), so every step's update is a fixed linear combination

  x_next = a·x + Σ_k c_k·x̂_0(step i − k) + s·z                          (z ~ N(0, I), s ≠ 0 only for the SDE)

whose coefficients are computed once in float64 NumPy from the timesteps (`_coefficients`) and scanned over in
float32; the scan carry holds x and the last few x̂_0. UniPC also corrects x before predicting from it: x_c = a'·x'
+ Σ_k c'_k·x̂_0(step i − k), x' being the previous step's (corrected) input.

Timesteps are 0-indexed, t ∈ {0, …, T−1}, as in diffusion.py and in diffusers. `solver_timesteps` reproduces
diffusers' `timestep_spacing` lists exactly; `solve` with the same model outputs and noise reproduces diffusers'
DPMSolverMultistepScheduler and UniPCMultistepScheduler (default settings otherwise) step by step, to float32
rounding (tests/test_solvers.py). Where diffusers departs from the papers, the method's docstring says so.
"""
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import progress as progress_lib

METHODS = ("dpm_solver++", "sde_dpm_solver++", "unipc")
MAX_ORDER = {"dpm_solver++": 3, "sde_dpm_solver++": 2, "unipc": 3}
SPACINGS = ("linspace", "leading", "trailing", "quadratic", "logsnr", "karras")


def spacing_of(spacing):
  """The spacing config.sampling.spacing names: 'auto' is 'logsnr', the one DPM-Solver recommends."""
  return "logsnr" if spacing == "auto" else spacing


def solver_timesteps(num_timesteps, num_steps, spacing, *, alphas_cumprod=None):
  """The timesteps t_0 > … > t_{n−1} a solver evaluates the network at: descending int32 [num_steps] (static).

  The chain then takes one more step, from t_{n−1} to σ = 0. The spacings:
    'linspace', 'leading', 'trailing': exactly diffusers' `timestep_spacing` of DPMSolverMultistepScheduler and
      UniPCMultistepScheduler (steps_offset = 0, no λ clipping). 'linspace' rounds linspace(0, T−1, n+1) and drops
      its 0, so it ends at ≈ (T−1)/n; 'leading' is k·(T // (n+1)) for k = n, …, 1 (it never reaches T−1);
      'trailing' is round(T − k·T/n) − 1 for k = 0, …, n−1 (it starts at T−1 and ends at T/n − 1).
    'quadratic' (ours, after DDIM's quadratic schedule, Song et al. 2021 §D.2): t_k = round((T−1)·(k/n)²) for
      k = n, …, 1, i.e. 'linspace' with the fraction squared: denser near t = 0, where the data's detail is made.
    'logsnr' (ours; the spacing DPM-Solver recommends, Lu et al. 2022a §3.3): n points uniform in λ from λ(T−1)
      to λ(0), each mapped to the t whose λ is nearest; it starts at T−1 and ends at 0. Needs alphas_cumprod
      (e.g. diffusion.alphas_cumprod).
    'karras': the timesteps of `karras_sigmas` (Karras et al. 2022), each noise level's t interpolated in log σ
      over the table and rounded, exactly as diffusers' `use_karras_sigmas=True`. The solver steps between the
      continuous noise levels themselves (pass them to `plan` as sigmas); only the network sees the rounded t.
      Needs alphas_cumprod.
  Ours are made distinct by moving colliding steps up by one (only for n close to T); every spacing checks that its
  list is distinct and in [0, T−1], and raises ValueError if not (diffusers' own lists collide for large n).
  """
  T, n = num_timesteps, num_steps
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
    raise ValueError(f"num_steps must be an int in [1, {T}] (the diffusion's T), got {n!r}.")
  if spacing == "linspace":
    steps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
  elif spacing == "leading":
    steps = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64)
  elif spacing == "trailing":
    steps = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
  elif spacing == "quadratic":
    steps = _distinct_ascending(np.round((T - 1) * (np.arange(1, n + 1) / n) ** 2).astype(np.int64))[::-1]
  elif spacing == "logsnr":
    ac = _table(alphas_cumprod, T, spacing)
    lam = 0.5 * (np.log(ac) - np.log1p(-ac))
    targets = np.linspace(lam[T - 1], lam[0], n)
    nearest = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)  # descending t, as λ rises while t falls
    steps = _distinct_ascending(nearest[::-1])[::-1]
  elif spacing == "karras":
    log_sigmas = np.log(_sigmas(_table(alphas_cumprod, T, spacing)))  # ascending in t
    steps = np.interp(np.log(karras_sigmas(alphas_cumprod, n)), log_sigmas, np.arange(T)).round().astype(np.int64)
  else:
    raise ValueError(f"Unknown timestep spacing {spacing!r}; choose one of {SPACINGS}.")
  if len(steps) != n or np.any(np.diff(steps) >= 0) or steps[0] > T - 1 or steps[-1] < 0:
    raise ValueError(f"spacing={spacing!r} gives no {n} distinct timesteps in [0, {T - 1}] for T = {T}: {steps}; "
                     "use fewer steps or another spacing.")
  return steps.astype(np.int32)


def karras_sigmas(alphas_cumprod, num_steps, rho=7.0):
  """The 'karras' spacing's n noise levels σ = √((1 − ᾱ)/ᾱ), descending from σ(T−1) to σ(0), uniform in σ^(1/ρ).

  Karras et al. 2022 (EDM), eq. 5 with their ρ = 7: dense at low noise, where a step's error shows most.
  float64 [num_steps]; the solver's α = 1/√(1 + σ²) and σ_t = σ·α at each step.
  """
  sigmas = _sigmas(_table(alphas_cumprod, len(alphas_cumprod), "karras"))
  lo, hi = sigmas[0] ** (1.0 / rho), sigmas[-1] ** (1.0 / rho)
  return (hi + np.linspace(0.0, 1.0, num_steps) * (lo - hi)) ** rho


def _table(alphas_cumprod, T, spacing):
  if alphas_cumprod is None:
    raise ValueError(f"spacing={spacing!r} needs alphas_cumprod (e.g. diffusion.alphas_cumprod).")
  ac = np.asarray(alphas_cumprod, np.float64)
  if ac.shape != (T,):
    raise ValueError(f"alphas_cumprod must have shape [{T}], got {ac.shape}.")
  return ac


def _sigmas(ac):
  return np.sqrt((1.0 - ac) / ac)


def _distinct_ascending(steps):
  # Moves each step up to at least one past the previous one; the caller checks the result stays below T.
  out = np.array(steps, np.int64)
  for k in range(1, len(out)):
    out[k] = max(out[k], out[k - 1] + 1)
  return out


def _orders(method, order, n):
  """The order of each of the n steps (static): warm-up at the start and diffusers' lower orders at the end."""
  j = np.arange(n)
  if method == "unipc":
    # UniPCMultistepScheduler, lower_order_final=True: min(order, steps left, steps so far + 1), for any n.
    return np.minimum(np.minimum(order, n - j), j + 1)
  # DPMSolverMultistepScheduler: first order at the start and at the last step (to σ = 0); with lower_order_final
  # and n < 15 the last-but-one step is at most second order.
  orders = np.minimum(order, j + 1)
  orders[-1] = 1
  if 2 <= n < 15:
    orders[-2] = min(orders[-2], 2)
  return orders


def _unipc_rhos(rks, hh, order, predictor):
  """UniPC's ρ for hh = −h, B = e^hh − 1 ('bh2'): R ρ = b, R_ik = r_k^(i−1), b_i = i!·hh·φ_{i+1}(hh)/B.

  The predictor of order p solves the first p−1 rows on the p−1 previous points; the corrector of order p the full
  p×p system, the last point being the new one (r = 1). As in diffusers and the authors' code, ρ = 1/2 where the
  system is 1×1 (2nd-order predictor, 1st-order corrector) instead of its solution, which tends to 1/2 as h → 0.
  φ_1(z) = (e^z − 1)/z, φ_{k+1}(z) = (φ_k(z) − 1/k!)/z.
  """
  b_h = np.expm1(hh)
  h_phi_k = np.expm1(hh) / hh - 1.0
  factorial = 1.0
  b = []
  for i in range(1, order + 1):
    b.append(h_phi_k * factorial / b_h)
    factorial *= i + 1
    h_phi_k = h_phi_k / hh - 1.0 / factorial
  rks = np.append(rks, 1.0)
  rows = np.stack([rks ** (i - 1) for i in range(1, order + 1)])
  if predictor:
    return np.array([0.5]) if order == 2 else np.linalg.solve(rows[:-1, :-1], np.array(b[:-1]))
  return np.array([0.5]) if order == 1 else np.linalg.solve(rows, np.array(b))


def _coefficients(method, order, alpha, sigma):
  """Per-step float64 coefficients of the update (module docstring), each [n] or [n, K + 1] over x̂_0 history.

  alpha, sigma: α and σ at each of the n steps' timesteps, float64 [n].

  Returns dict: alpha, sigma (of the step's own t, for x̂_0), a, c, noise (the step), and for UniPC corr_last,
  corr_c (its corrector; zero where it is off: the first step).
  """
  n = len(alpha)
  lam = np.log(alpha) - np.log(sigma)
  # The step's target: the next timestep, then σ = 0 (α = 1, λ = ∞) at the end.
  alpha_to, sigma_to, lam_to = np.append(alpha[1:], 1.0), np.append(sigma[1:], 0.0), np.append(lam[1:], np.inf)
  h = lam_to - lam
  orders = _orders(method, order, n)
  history = order if method == "unipc" else max(order - 1, 1)
  a, c, noise = np.zeros(n), np.zeros((n, history + 1)), np.zeros(n)
  corr_last, corr_c = np.zeros(n), np.zeros((n, history + 1))
  for i in range(n):
    p, at, st = orders[i], alpha_to[i], sigma_to[i]
    r = [(lam[i - k + 1] - lam[i - k]) / h[i] for k in range(1, p)]  # r_k = h_{i−k} / h_i > 0
    if method == "dpm_solver++":
      a[i] = st / sigma[i]
      phi = -at * np.expm1(-h[i])  # α_t (1 − e^{−h})
      if p == 1:
        c[i, 0] = phi
      elif p == 2:
        # 'midpoint': D = x̂_0(s) + (x̂_0(s) − x̂_0(s_1)) / (2 r).
        c[i, 0], c[i, 1] = phi * (1 + 0.5 / r[0]), -phi * 0.5 / r[0]
      else:
        hi = h[i]
        psi1 = at * (np.expm1(-hi) / hi + 1.0)  # α_t ((e^{−h} − 1)/h + 1), on the first difference D1
        psi2 = at * ((np.expm1(-hi) + hi) / hi**2 - 0.5)  # α_t ((e^{−h} − 1 + h)/h² − 1/2), minus, on D2
        r0, r1 = r
        # D1 = u + r0/(r0+r1)·(u − v), D2 = (u − v)/(r0+r1), u = (m0 − m1)/r0, v = (m1 − m2)/r1.
        cu = psi1 * (1.0 + r0 / (r0 + r1)) - psi2 / (r0 + r1)
        cv = -psi1 * r0 / (r0 + r1) + psi2 / (r0 + r1)
        c[i, 0], c[i, 1], c[i, 2] = phi + cu / r0, -cu / r0 + cv / r1, -cv / r1
    elif method == "sde_dpm_solver++":
      a[i] = st / sigma[i] * np.exp(-h[i])
      phi = -at * np.expm1(-2.0 * h[i])  # α_t (1 − e^{−2h})
      noise[i] = st * np.sqrt(-np.expm1(-2.0 * h[i]))
      if p == 1:
        c[i, 0] = phi
      else:
        c[i, 0], c[i, 1] = phi * (1 + 0.5 / r[0]), -phi * 0.5 / r[0]
    else:
      # UniP-p (bh2, data prediction): x' = (σ_t/σ_s) x − α_t (e^{−h} − 1) m_0 − α_t B Σ_k ρ_k (m_k − m_0)/r_k.
      hh = -h[i]
      b_h = np.expm1(hh)  # 'bh2': B = e^{−h} − 1, the same as the first-order coefficient's e^{−h} − 1
      a[i] = st / sigma[i]
      c[i, 0] = -at * np.expm1(hh)
      if p > 1:
        rks = -np.cumsum(r)  # (λ_{s_k} − λ_s)/h: the earlier points lie at negative r
        rhos = _unipc_rhos(rks, hh, p, predictor=True)
        for k in range(1, p):
          w = -at * b_h * rhos[k - 1] / rks[k - 1]
          c[i, k] += w
          c[i, 0] -= w
      if i > 0:
        # UniC-q at the step's own point x_i, q being the previous predictor's order: redoes the previous step
        # from its input with the new x̂_0(t_i) as one more point (r = 1); no extra network call.
        q, hc = orders[i - 1], h[i - 1]
        hh, a_i = -hc, alpha[i]
        b_h = np.expm1(hh)
        corr_last[i] = sigma[i] / sigma[i - 1]
        corr_c[i, 1] = -a_i * np.expm1(hh)  # m_0 of the corrector is x̂_0(t_{i−1})
        rks = np.array([(lam[i - 1 - k] - lam[i - 1]) / hc for k in range(1, q)])
        rhos = _unipc_rhos(rks, hh, q, predictor=False)
        for k in range(1, q):
          w = -a_i * b_h * rhos[k - 1] / rks[k - 1]
          corr_c[i, k + 1] += w
          corr_c[i, 1] -= w
        w = -a_i * b_h * rhos[-1]  # on x̂_0(t_i) − x̂_0(t_{i−1})
        corr_c[i, 0] += w
        corr_c[i, 1] -= w
  return dict(alpha=alpha, sigma=sigma, a=a, c=c, noise=noise, corr_last=corr_last, corr_c=corr_c)


def solve(model_fn, diffusion, x_T, timesteps, *, method, order, sigmas=None, noise_fn=None, clip_denoised=False,
          report=None, return_trajectory=False):
  """Runs a fast solver from x_T at timesteps[0] down to σ = 0 as ONE `lax.scan` over the steps; returns x_0.

  model_fn(x_t, t_B) → network output (ε, x̂_0 or x_{t−1} per diffusion.model_mean_type; a learned-variance half
  is ignored). timesteps: descending distinct ints in [0, T−1], e.g. solver_timesteps(T, n, 'linspace') (static,
  NumPy); the network is evaluated once per timestep (n calls), at the original t. x_T [B, …] is the sample at
  timesteps[0] (for the usual start, timesteps[0] = T−1 and x_T ~ N(0, I); diffusers does the same, with no
  rescaling of x_T for ᾱ_{T−1} > 0). The diffusion must be concrete (closed over, not a jit argument): the
  coefficients are computed from its tables in float64 NumPy.

  method, order:
    'dpm_solver++', 1–3: multistep DPM-Solver++ (Lu et al. 2022b, arXiv:2211.01095), with r = h_{i−1}/h_i:
      x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) D. Order 1 (D = x̂_0(s)) is DDIM; order 2 is DPM-Solver++(2M), the
      paper's Algorithm 2: D = (1 + 1/2r) x̂_0(s) − 1/2r x̂_0(s_1) (diffusers' solver_type='midpoint'); order 3 adds
      the φ_2, φ_3 terms on first and second divided differences, as the authors' code does
      (`multistep_dpm_solver_third_update`; the paper has no 3M pseudocode). Matches diffusers'
      DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', solver_order=order, solver_type='midpoint',
      lower_order_final=True, euler_at_final=False, final_sigmas_type='zero').
    'sde_dpm_solver++', 1–2: SDE-DPM-Solver++1 and ++(2M) (Lu et al. 2022b, appendix):
      x_t = (σ_t/σ_s) e^{−h} x_s + α_t (1 − e^{−2h}) D + σ_t √(1 − e^{−2h}) z, with the D above. noise_fn(i) → z,
      the standard normals of step i (an array like x_T; i is a traced int32 scalar, timesteps[i] its t), is
      required. Matches algorithm_type='sde-dpmsolver++' (solver_type='midpoint') given z as `variance_noise`.
    'unipc', 1–3: UniPC (Zhao et al. 2023, arXiv:2302.04867), data prediction, B(h) = e^{−h} − 1 ('bh2'). The
      UniP-p predictor x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) x̂_0(s) − α_t B(h) Σ_k ρ_k (x̂_0(s_k) − x̂_0(s))/r_k
      (r_k = (λ_{s_k} − λ_s)/h < 0) on p − 1 earlier points; then, at the next step, the UniC corrector redoes it
      with the new point x̂_0(t) (r = 1) added, at no extra network call, on every step but the last (nothing
      evaluates x_0). ρ solves the order conditions R ρ = b, R_ik = r_k^(i−1), b_i = −i!·h φ_{i+1}(−h)/B(h)
      (`_unipc_rhos`). Matches UniPCMultistepScheduler(predict_x0=True, solver_type='bh2', lower_order_final=True,
      disable_corrector=[], solver_order=order, final_sigmas_type='zero').

  Order schedule (as diffusers): a multistep method starts at first order and gains one per step until `order`.
  DPM-Solver(++) takes the last step (to σ = 0) at first order and, for n < 15 steps, the one before at most at
  second (lower_order_final); UniPC uses min(order, steps left) throughout. Departures of diffusers (and of the
  authors' code) from the papers, all reproduced here: the chain ends at σ = 0 with a first-order step, which
  returns the last x̂_0 (the papers stop at a small t = ε); the order is lowered near the end; UniPC's 2nd-order
  predictor and 1st-order corrector use ρ = 1/2 rather than the solution of their 1×1 system; 3M is not in the
  paper's pseudocode. diffusers computes its coefficients in float32 (including 1 − ᾱ, which loses digits at
  small t); here they are float64, from diffusion.alphas_cumprod and diffusion.one_minus_alphas_cumprod.

  clip_denoised clips each x̂_0 to [-1, 1] before it enters the update (diffusers' `thresholding` and
  `clip_sample` are off by default for these schedulers, hence default False here: parity holds only so).
  report: None, or a trace-time hook report(done) (progress.host_hook) called every few steps with the number of
  steps run so far, as in sampling._chain. return_trajectory: also return x after every step [n, *x_T.shape]
  (the last being x_0; for UniPC the predictor's output, before the next step corrects it, like diffusers'
  `prev_sample`).
  """
  return run(model_fn, diffusion, x_T, plan(diffusion, timesteps, method=method, order=order, sigmas=sigmas),
             method=method, noise_fn=noise_fn, clip_denoised=clip_denoised, report=report,
             return_trajectory=return_trajectory)


def plan(diffusion, timesteps, *, method, order, sigmas=None):
  """What `run` scans over: per step, its index i, t and the update's coefficients (float32 arrays [n, …]).

  Computed from the concrete diffusion's tables in float64 NumPy (outside any jit/pmap), so a compiled chain
  can take the plan as an argument while the diffusion itself is traced. sigmas: None (each step at the noise
  level of its timestep), or the steps' own noise levels σ = √((1 − ᾱ)/ᾱ), float [n] (`karras_sigmas`).
  """
  if method not in METHODS:
    raise ValueError(f"Unknown solver method {method!r}; choose one of {METHODS}.")
  if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= order <= MAX_ORDER[method]:
    raise ValueError(f"method={method!r} supports order 1 to {MAX_ORDER[method]}, got {order!r}.")
  total = diffusion.num_timesteps
  timesteps = np.asarray(timesteps)
  if (timesteps.ndim != 1 or len(timesteps) < 1 or not np.issubdtype(timesteps.dtype, np.integer)
      or np.any(np.diff(timesteps) >= 0) or timesteps[0] > total - 1 or timesteps[-1] < 0):
    raise ValueError(f"timesteps must be descending distinct ints in [0, {total - 1}] (see solver_timesteps), "
                     f"got {timesteps}.")
  if sigmas is None:
    try:
      alpha = np.sqrt(np.asarray(diffusion.alphas_cumprod, np.float64)[timesteps])
      # 1 − ᾱ from its own float64 table, exact at small t.
      sigma = np.sqrt(np.asarray(diffusion.one_minus_alphas_cumprod, np.float64)[timesteps])
    except jax.errors.TracerArrayConversionError:
      raise ValueError("solve needs a concrete diffusion: close over the diffusion instead of passing it as a "
                       "jit argument.") from None
  else:
    sigmas = np.asarray(sigmas, np.float64)
    if sigmas.shape != timesteps.shape or np.any(np.diff(sigmas) >= 0) or sigmas[-1] <= 0:
      raise ValueError(f"sigmas must be {len(timesteps)} positive descending noise levels, one per timestep, got "
                       f"{sigmas}.")
    alpha = 1.0 / np.sqrt(1.0 + sigmas**2)
    sigma = sigmas * alpha
  coef = _coefficients(method, order, alpha, sigma)
  return dict(i=np.arange(len(timesteps), dtype=np.int32), t=timesteps.astype(np.int32),
              **{k: v.astype(np.float32) for k, v in coef.items()})


def run(model_fn, diffusion, x_T, plan, *, method, noise_fn=None, clip_denoised=False, report=None,
        return_trajectory=False):
  """`solve` on the `plan` of `method` (the plan may be a traced argument of the compiled program)."""
  if method == "sde_dpm_solver++" and noise_fn is None:
    raise ValueError("method='sde_dpm_solver++' needs noise_fn(step_index) → standard normals like x_T.")
  n, history = plan["i"].shape[0], plan["c"].shape[1] - 1
  dtype = x_T.dtype
  batch = x_T.shape[0]
  every = progress_lib.loop_every(n)
  scanned = {k: (v if k in ("i", "t") else jnp.asarray(v, dtype)) for k, v in plan.items()}

  def denoise(x, t_scalar, alpha, sigma):
    t = jnp.full((batch,), t_scalar, jnp.int32)
    out, _ = diffusion.split_model_output(model_fn(x, t))
    if diffusion.model_mean_type == "eps":
      x0 = (x - sigma * out) / alpha  # diffusers' order of operations
    elif diffusion.model_mean_type == "v":
      x0 = alpha * x - sigma * out  # diffusers' order of operations
    else:
      x0 = diffusion.predict_start(x, t, out)
    return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

  def combine(weights, ms):
    return sum(weights[k] * ms[k] for k in range(history + 1))

  def body(carry, step):
    x, x_last, hist = carry
    i = step["i"]
    if report is not None:
      jax.lax.cond(i % every == 0, lambda: report(i + 1), lambda: None)
    m = denoise(x, step["t"], step["alpha"], step["sigma"])
    ms = [m] + [hist[k] for k in range(history)]  # x̂_0 of steps i, i−1, …
    if method == "unipc":
      # Zero coefficients at i = 0 would still give 0·x_last; keep x itself there (no corrector yet).
      x = jnp.where(i > 0, step["corr_last"] * x_last + combine(step["corr_c"], ms), x)
    x_next = step["a"] * x + combine(step["c"], ms)
    if method == "sde_dpm_solver++":
      x_next = x_next + step["noise"] * noise_fn(i).astype(dtype)
    hist = jnp.concatenate([m[None], hist[:-1]], axis=0)
    return (x_next, x, hist), (x_next if return_trajectory else None)

  init = (x_T, x_T, jnp.zeros((history,) + x_T.shape, dtype))
  (x_0, _, _), trajectory = jax.lax.scan(body, init, scanned)
  return (x_0, trajectory) if return_trajectory else x_0
