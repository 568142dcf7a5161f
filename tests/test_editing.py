"""Inpainting and SDEdit: RePaint's schedule against diffusers, exactness of the kept pixels, equality with the plain
chain, closed-form data sets whose answer is known, split invariance; and the masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import diffusion as dlib
from ddpm_jax import editing
from ddpm_jax import masks
from ddpm_jax import respacing
from ddpm_jax import sampling

T = 50
SHAPE = (4, 8, 8, 1)


def small_diffusion(var_type="fixedlarge", schedule="linear", mean_type="eps", num_timesteps=T):
  betas = dlib.get_beta_schedule(schedule, beta_end=0.2, num_timesteps=num_timesteps)
  return dlib.GaussianDiffusion(betas, model_mean_type=mean_type, model_var_type=var_type)


def rows(a):
  return a[:, None, None, None]


def some_model(x_t, t):
  """An arbitrary ε-model that depends on both x_t and t (so a wrong t or a wrong x_t shows)."""
  return jnp.tanh(x_t) * rows(1.0 - t / T) + 0.1 * rows(jnp.cos(t.astype(jnp.float32)))


def mixture_eps(d, points):
  """The exact ε̂ of data that is one of points [K, H, W, C] with equal weight: E[ε | x_t] via the posterior
  weights of the points, softmax_k(−‖x_t − √ᾱ x_k‖² / 2(1 − ᾱ))."""
  def model_fn(x_t, t):
    sa, s1 = rows(d.sqrt_alphas_cumprod[t]), rows(d.sqrt_one_minus_alphas_cumprod[t])
    dist2 = jnp.sum(jnp.square(x_t[:, None] - sa[:, None] * points[None]), axis=(2, 3, 4))  # [B, K]
    weights = jax.nn.softmax(-dist2 / (2.0 * jnp.square(s1[:, :, 0, 0])), axis=1)
    return (x_t - sa * jnp.einsum("bk,khwc->bhwc", weights, points)) / s1
  return model_fn


def images_and_mask(seed=0, shape=SHAPE):
  images = jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1.0, maxval=1.0)
  return images, jnp.asarray(masks.named("random", shape[0], shape[1], shape[2], seed=seed))


# ---------------------------------------------------------------------------------------------------------------
# RePaint's schedule


@pytest.mark.parametrize("num_steps,jumps,jump_length,num_train", [
    (4, 2, 2, 8), (20, 10, 10, 100), (25, 3, 4, 100), (10, 1, 3, 10), (7, 3, 1, 7), (12, 2, 11, 24), (12, 3, 12, 12),
    (250, 10, 10, 1000)])
def test_schedule_matches_diffusers_repaint(num_steps, jumps, jump_length, num_train):
  from diffusers import RePaintScheduler  # pylint: disable=g-import-not-at-top
  scheduler = RePaintScheduler(num_train_timesteps=num_train)
  scheduler.set_timesteps(num_steps, jump_length=jump_length, jump_n_sample=jumps)
  # diffusers keeps original t = i·(T // n) for chain index i (its 'leading' respacing); ours are chain indices.
  expected = scheduler.timesteps.numpy() // (num_train // num_steps)
  np.testing.assert_array_equal(editing.repaint_schedule(num_steps, jumps, jump_length), expected)


def test_schedule_by_hand():
  np.testing.assert_array_equal(editing.repaint_schedule(4, 2, 2), [3, 2, 1, 0, 1, 2, 1, 0])
  np.testing.assert_array_equal(editing.repaint_schedule(5, 1, 2), [4, 3, 2, 1, 0])


# ---------------------------------------------------------------------------------------------------------------
# Inpainting


def test_inpaint_keeps_known_pixels_exactly_and_fills_the_rest():
  d = small_diffusion()
  images, mask = images_and_mask(shape=(4, 8, 8, 2))  # a [B, H, W, 1] mask for 2 channels
  run = jax.jit(lambda x, m, r: editing.inpaint(some_model, d, x, m, r, num_steps=10, jumps=2, jump_length=3))
  out = np.asarray(run(images, mask, jax.random.PRNGKey(1)))
  known = np.broadcast_to(np.asarray(mask) > 0.5, out.shape)
  np.testing.assert_array_equal(out[known], np.asarray(images)[known])
  assert np.abs(out[~known] - np.asarray(images)[~known]).mean() > 0.1  # the rest is generated, not copied
  # A full-shape mask is the same mask.
  np.testing.assert_array_equal(run(images, jnp.broadcast_to(mask, images.shape), jax.random.PRNGKey(1)), out)


@pytest.mark.parametrize("num_steps,var_type", [(None, "fixedlarge"), (7, "fixedlarge"), (7, "fixedsmall")])
def test_inpaint_without_known_pixels_or_jumps_is_sample_loop(num_steps, var_type):
  d = small_diffusion(var_type)
  images = jnp.full(SHAPE, 0.3)  # ignored: nothing is known
  rng = jax.random.PRNGKey(3)
  out = jax.jit(lambda r: editing.inpaint(some_model, d, images, jnp.zeros(SHAPE[:3] + (1,)), r,
                                          num_steps=num_steps, jumps=1))(rng)
  ref = jax.jit(lambda r: sampling.sample_loop(some_model, d, r, SHAPE, num_steps=num_steps))(rng)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)  # draw for draw; only XLA's fusion may differ
  other = sampling.sample_loop(some_model, d, jax.random.PRNGKey(4), SHAPE, num_steps=num_steps)
  assert np.abs(other - ref).max() > 0.1  # the comparison can fail


def test_inpaint_calls_the_network_along_the_schedule_in_one_trace():
  d = small_diffusion()
  seen, traces = [], []
  def model_fn(x_t, t):
    traces.append(1)
    jax.debug.callback(lambda tt: seen.append(int(tt[0])), t, ordered=True)
    return some_model(x_t, t)
  images, mask = images_and_mask()
  jax.jit(lambda r: editing.inpaint(model_fn, d, images, mask, r, num_steps=9, jumps=3, jump_length=4))(
      jax.random.PRNGKey(0)).block_until_ready()
  jax.effects_barrier()
  walk = editing.repaint_schedule(9, 3, 4)
  down = walk < np.append(walk[0] + 1, walk[:-1])
  assert seen == respacing.spaced_timesteps(T, 9)[walk[down]].tolist()
  assert len(seen) == 9 + 2 * (3 - 1) * 4  # blocks at 0 and 4 (< 9 − 4), each 4 steps redone twice
  assert len(traces) == 1  # one traced step inside a scan


def test_inpaint_never_reuses_a_noise_key():
  walk = editing.repaint_schedule(10, 3, 3)
  timesteps = respacing.spaced_timesteps(T, 10)
  plan = editing._plan(walk, timesteps, T)  # pylint: disable=protected-access
  index, down, t, step_key, known_key = (np.asarray(a) for a in plan)
  down = down.astype(bool)
  np.testing.assert_array_equal(t[down], timesteps[walk[down]])
  np.testing.assert_array_equal(index[~down], walk[~down] - 1)  # re-noising to entry e: x_{e−2} → x_{e−1}
  keys = np.concatenate([step_key, known_key[down], [T]])  # x_T's key is T
  assert len(np.unique(keys)) == len(keys)
  # Each step's first visit is keyed like sample_loop's step at its original t.
  assert set(timesteps.tolist()) <= set(step_key.tolist())


def test_inpaint_shows_the_network_known_pixels_noised_to_its_timestep():
  """Whether reached by a denoising step (known part from q(x_{i−1} | x_0)) or by re-noising (x_i ~ q(x_i | x_{i−1})),
  the known pixels the network sees at original t are a draw of q(x_t | x_0) = N(√ᾱ_t x_0, 1 − ᾱ_t). 16·32 known
  pixels per call estimate the standardised mean to ±0.05 and std to ±3% (1σ); adjacent kept t differ in 1 − ᾱ by
  ≥ 3× at small t, so an off-by-one level or a wrong re-noising β fails the ±15% bound."""
  d = small_diffusion()
  seen = []
  def model_fn(x_t, t):
    jax.debug.callback(lambda tt, xx: seen.append((int(tt[0]), np.asarray(xx))), t, x_t, ordered=True)
    return some_model(x_t, t)
  images = jnp.full((16, 8, 8, 1), 0.5)
  half = jnp.asarray(masks.named("half", 16, 8, 8))
  editing.inpaint(model_fn, d, images, half, jax.random.PRNGKey(0), num_steps=10, jumps=3, jump_length=3)
  jax.effects_barrier()
  assert len(seen) == 10 + 3 * 2 * 3  # blocks at 0, 3 and 6 (< 10 − 3), each 3 steps redone twice
  for t, x in seen:
    ac = float(d.alphas_cumprod[t])
    z = (x[:, :4] - np.sqrt(ac) * 0.5) / np.sqrt(1.0 - ac)  # the known top half, standardised
    assert abs(z.mean()) < 0.15 and abs(z.std() - 1.0) < 0.15, (t, z.mean(), z.std())


@pytest.mark.parametrize("jumps", [1, 3])
def test_inpaint_recovers_the_matching_point_of_a_two_point_data_set(jumps):
  """Data is one of two images a, b; knowing the top half of a (or b), the exact posterior puts all its mass on a
  (or b), so the inpainted bottom half must be a's (b's). At the last steps (1 − ᾱ ≈ 1e-4) the posterior weights
  round to exactly 0 and 1 in float32, so x̂_0 is the point itself: any error beyond float rounding is a bug."""
  d = small_diffusion()
  points = jnp.clip(0.5 * jax.random.normal(jax.random.PRNGKey(7), (2, 8, 8, 1)), -0.9, 0.9)
  truth = points[jnp.array([0, 0, 0, 0, 1, 1, 1, 1])]
  half = jnp.asarray(masks.named("half", 8, 8, 8))
  model_fn = mixture_eps(d, points)
  run = jax.jit(lambda m, r: editing.inpaint(model_fn, d, truth, m, r, num_steps=25, jumps=jumps, jump_length=5))
  out = run(half, jax.random.PRNGKey(0))
  np.testing.assert_allclose(out, truth, atol=1e-4)
  # Unconditionally (nothing known) the same chain returns a or b at random, not always the matching one.
  free = run(jnp.zeros_like(half), jax.random.PRNGKey(0))
  nearest = jnp.argmin(jnp.sum(jnp.square(free[:, None] - points[None]), axis=(2, 3, 4)), axis=1)
  np.testing.assert_allclose(free, points[nearest], atol=1e-4)
  assert np.any(np.asarray(nearest) != np.array([0, 0, 0, 0, 1, 1, 1, 1]))


def test_inpaint_of_a_batch_equals_its_halves():
  d = small_diffusion()
  images, mask = images_and_mask()
  run = jax.jit(lambda x, m, i: editing.inpaint(some_model, d, x, m, jax.random.PRNGKey(5), num_steps=8, jumps=2,
                                                jump_length=3, first_index=i))
  whole = run(images, mask, 0)
  halves = jnp.concatenate([run(images[:2], mask[:2], 0), run(images[2:], mask[2:], 2)])
  np.testing.assert_allclose(halves, whole, rtol=0, atol=1e-6)
  assert np.abs(run(images[2:], mask[2:], 0) - whole[2:]).max() > 0.1  # first_index matters


# ---------------------------------------------------------------------------------------------------------------
# SDEdit


@pytest.mark.filterwarnings("ignore:divide by zero")  # 1/ᾱ at ᾱ_{T−1} = 0, a table the x_0 model never reads
@pytest.mark.parametrize("method,num_steps", [("ancestral", None), ("ancestral", 5), ("ddim", 5)])
def test_sdedit_at_full_strength_is_sample_loop(method, num_steps):
  """With the 'jsd' schedule β_T = 1, so ᾱ_{T−1} = 0 and q(x_{T−1} | x_0) is exactly N(0, I) whatever the image: SDEdit
  at strength 1 is then sample_loop, draw for draw (its x_start keyed as sample_loop's x_T). An x_0-predicting model
  keeps the step at ᾱ = 0 finite."""
  d = small_diffusion(schedule="jsd", mean_type="xstart", num_timesteps=20)
  model_fn = lambda x, t: jnp.tanh(x) * rows(0.5 + t / 40.0)
  images = jax.random.uniform(jax.random.PRNGKey(0), SHAPE, minval=-1.0, maxval=1.0)
  rng = jax.random.PRNGKey(1)
  out = editing.sdedit(model_fn, d, images, 1.0, rng, num_steps=num_steps, method=method, eta=0.0)
  ref = sampling.sample_loop(model_fn, d, rng, SHAPE, num_steps=num_steps, method=method, eta=0.0)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
  if method == "ancestral":  # its noise depends on the key (DDIM with η = 0 does not)
    assert np.abs(editing.sdedit(model_fn, d, images, 1.0, jax.random.PRNGKey(2)) - ref).max() > 0.1


def test_sdedit_starts_at_the_largest_kept_timestep_below_strength():
  # T = 50, 10 'even' steps keep round(i·49/9) = 0, 5, 11, 16, 22, 27, 33, 38, 44, 49; 0.5·50 = 25 → 22.
  assert editing.start_timestep(T, 10, 0.5) == 22
  assert editing.start_timestep(T, 10, 1.0) == 49
  assert editing.start_timestep(T, None, 0.5) == 25
  assert editing.start_timestep(100, None, 0.29) == 29  # 0.29·100 = 28.999… in floating point
  seen = []
  def model_fn(x_t, t):
    jax.debug.callback(lambda tt: seen.append(int(tt[0])), t, ordered=True)
    return some_model(x_t, t)
  editing.sdedit(model_fn, small_diffusion(), jnp.zeros(SHAPE), 0.5, jax.random.PRNGKey(0), num_steps=10)
  jax.effects_barrier()
  assert seen == [22, 16, 11, 5, 0]


def test_sdedit_error_grows_with_strength_as_the_gaussian_posterior_says():
  """Data N(0, s²I) with its exact ε̂. SDEdit from x_t0 = √ᾱ x_0 + √(1 − ᾱ) ε returns about a draw of p(x_0 | x_t0),
  as is x_0 itself, so E(out − x_0)² ≈ 2 Var(x_0 | x_t0) = 2 s²(1 − ᾱ)/(ᾱ s² + 1 − ᾱ) per pixel. 16·64 pixels
  estimate the RMS to ~3%; the DDPM chain with σ² = β̃ is not exactly the posterior sampler, hence ±25%."""
  s = 0.5
  d = small_diffusion("fixedsmall")
  def model_fn(x_t, t):
    ac = rows(d.alphas_cumprod[t])
    return x_t * rows(d.sqrt_one_minus_alphas_cumprod[t]) / (ac * s**2 + rows(d.one_minus_alphas_cumprod[t]))
  images = s * jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 1))
  for strength in (0.06, 0.3, 0.8):
    t0 = editing.start_timestep(T, None, strength)
    ac = float(d.alphas_cumprod[t0])
    expected = np.sqrt(2 * s**2 * (1 - ac) / (ac * s**2 + 1 - ac))
    out = editing.sdedit(model_fn, d, images, strength, jax.random.PRNGKey(1), clip_denoised=False)
    rms = float(jnp.sqrt(jnp.mean(jnp.square(out - images))))
    assert 0.75 * expected < rms < 1.25 * expected, (strength, rms, expected)


def test_sdedit_with_a_one_point_data_set_returns_the_point():
  d = small_diffusion()
  point = jnp.linspace(-0.9, 0.9, 64).reshape(1, 8, 8, 1)
  model_fn = mixture_eps(d, point)
  images = jax.random.uniform(jax.random.PRNGKey(0), SHAPE, minval=-1.0, maxval=1.0)
  for method in ("ancestral", "ddim"):
    out = editing.sdedit(model_fn, d, images, 0.6, jax.random.PRNGKey(1), num_steps=10, method=method)
    np.testing.assert_allclose(out, jnp.broadcast_to(point, SHAPE), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# One-line errors


@pytest.mark.parametrize("call,match", [
    (lambda d, x, m: editing.sdedit(some_model, d, x, 0.0, jax.random.PRNGKey(0)), "strength must be in"),
    (lambda d, x, m: editing.sdedit(some_model, d, x, 1.5, jax.random.PRNGKey(0)), "strength must be in"),
    (lambda d, x, m: editing.sdedit(some_model, d, x, 0.5, jax.random.PRNGKey(0), num_steps=1), "below the chain"),
    (lambda d, x, m: editing.sdedit(some_model, d, x, 0.5, jax.random.PRNGKey(0), method="unipc"), "method must be"),
    (lambda d, x, m: editing.inpaint(some_model, d, x, m, jax.random.PRNGKey(0), jumps=0), "jumps must be"),
    (lambda d, x, m: editing.inpaint(some_model, d, x, m, jax.random.PRNGKey(0), jump_length=0), "jump_length must"),
    (lambda d, x, m: editing.inpaint(some_model, d, x, m, jax.random.PRNGKey(0), num_steps=5), "exceeds the chain"),
    (lambda d, x, m: editing.inpaint(some_model, d, x, m[:, :4], jax.random.PRNGKey(0)), "mask has shape"),
    (lambda d, x, m: editing.inpaint(some_model, d, x, m, jax.random.PRNGKey(0), num_steps=0), "num_steps must"),
])
def test_editing_errors_are_one_line(call, match):
  images, mask = images_and_mask()
  with pytest.raises(ValueError, match=match) as e:
    call(small_diffusion(), images, mask)
  assert "\n" not in str(e.value)


def test_learned_variance_cannot_be_respaced():
  d = dlib.GaussianDiffusion(dlib.get_beta_schedule("linear", num_timesteps=T), model_var_type="learned",
                             loss_type="hybrid")
  images, mask = images_and_mask()
  with pytest.raises(ValueError, match="learned"):
    editing.inpaint(some_model, d, images, mask, jax.random.PRNGKey(0), num_steps=10, jumps=1)
  with pytest.raises(ValueError, match="learned"):
    editing.sdedit(some_model, d, images, 0.5, jax.random.PRNGKey(0), num_steps=10)


# ---------------------------------------------------------------------------------------------------------------
# Masks


def test_named_masks():
  half = masks.named("half", 3, 8, 6)
  assert half.shape == (3, 8, 6, 1) and half.dtype == np.float32
  assert half.mean() == 0.5 and np.all(half[:, :4] == 1) and np.all(half[:, 4:] == 0)
  center = masks.named("center", 2, 8, 8)[0, ..., 0]
  expected = np.ones((8, 8), np.float32)
  expected[2:6, 2:6] = 0
  np.testing.assert_array_equal(center, expected)
  rand = masks.named("random", 5, 16, 16, seed=0)
  assert rand.shape == (5, 16, 16, 1) and set(np.unique(rand)) == {0.0, 1.0}
  unknown = 1 - rand.mean(axis=(1, 2, 3))
  assert np.all(unknown >= 0.5) and np.all(unknown < 0.62), unknown
  assert len({m.tobytes() for m in rand}) == 5  # one mask per image
  np.testing.assert_array_equal(masks.named("random", 2, 16, 16, seed=0), rand[:2])  # keyed by image index
  assert not np.array_equal(masks.named("random", 5, 16, 16, seed=1), rand)


def test_load_masks_from_npz(tmp_path):
  rng = np.random.default_rng(0)
  known = rng.random((3, 8, 8)) < 0.5
  np.savez(tmp_path / "u8.npz", (known * 255).astype(np.uint8))
  np.savez(tmp_path / "u1.npz", known.astype(np.uint8)[..., None])
  np.savez(tmp_path / "bool.npz", known)
  for name in ("u8.npz", "u1.npz", "bool.npz"):
    out = masks.load(tmp_path / name, 2, 8, 8)
    assert out.shape == (2, 8, 8, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 0], known[:2])
  np.savez(tmp_path / "one.npz", known[:1])  # one mask for every image
  np.testing.assert_array_equal(masks.load(tmp_path / "one.npz", 4, 8, 8)[..., 0], np.repeat(known[:1], 4, axis=0))
  # 2×2 blocks of a 16×16 mask: nearest-neighbour resizing to 8×8 keeps one pixel per block.
  np.savez(tmp_path / "big.npz", np.repeat(np.repeat(known, 2, axis=1), 2, axis=2))
  np.testing.assert_array_equal(masks.load(tmp_path / "big.npz", 3, 8, 8)[..., 0], known)
  np.testing.assert_array_equal(masks.from_spec(str(tmp_path / "bool.npz"), 3, 8, 8), masks.load(
      tmp_path / "bool.npz", 3, 8, 8))


def test_load_masks_from_png_folder(tmp_path):
  rng = np.random.default_rng(1)
  known = rng.random((3, 8, 8)) < 0.5
  for i, name in enumerate(("b.png", "a.png", "c.png")):  # sorted: a, b, c = known[1], known[0], known[2]
    big = np.repeat(np.repeat(known[i], 2, axis=0), 2, axis=1).astype(np.uint8) * 200 + 20
    Image.fromarray(big).convert("RGB").save(tmp_path / name)  # colour converts to L; 220 vs 20 straddle 128
  (tmp_path / "notes.txt").write_text("not a mask")
  out = masks.from_spec(str(tmp_path), 3, 8, 8, seed=0)
  assert out.shape == (3, 8, 8, 1) and out.dtype == np.float32
  np.testing.assert_array_equal(out[..., 0], known[[1, 0, 2]])


def test_mask_errors_are_one_line(tmp_path):
  np.savez(tmp_path / "float.npz", np.ones((2, 8, 8), np.float32))
  np.savez(tmp_path / "values.npz", np.full((2, 8, 8), 3, np.uint8))
  np.savez(tmp_path / "ndim.npz", np.ones((8, 8), np.uint8))
  np.savez(tmp_path / "named.npz", masks=np.ones((2, 8, 8), np.uint8))
  np.savez(tmp_path / "objects.npz", np.array([{"a": 1}], dtype=object))
  (tmp_path / "text.npz").write_text("not a zip")
  (tmp_path / "empty").mkdir()
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  cases = [
      (lambda: masks.load(tmp_path / "float.npz", 2, 8, 8), "must be uint8 or bool"),
      (lambda: masks.load(tmp_path / "values.npz", 2, 8, 8), "use 0/1 or 0/255"),
      (lambda: masks.load(tmp_path / "ndim.npz", 2, 8, 8), "must be uint8 or bool"),
      (lambda: masks.load(tmp_path / "named.npz", 2, 8, 8), "no 'arr_0'"),
      (lambda: masks.load(tmp_path / "objects.npz", 1, 8, 8), "cannot read"),
      (lambda: masks.load(tmp_path / "text.npz", 1, 8, 8), "cannot read"),
      (lambda: masks.load(tmp_path / "values.npz", 3, 8, 8), "use 0/1"),
      (lambda: masks.load(tmp_path / "empty", 1, 8, 8), "no .png files"),
      (lambda: masks.load(tmp_path / "broken", 1, 8, 8), "cannot decode"),
      (lambda: masks.from_spec("nowhere.npz", 1, 8, 8), "Unknown mask"),
      (lambda: masks.named("stripes", 1, 8, 8), "Unknown mask"),
  ]
  np.savez(tmp_path / "two.npz", np.ones((2, 8, 8), np.uint8))
  cases.append((lambda: masks.load(tmp_path / "two.npz", 3, 8, 8), "holds 2 masks for 3 images"))
  for call, match in cases:
    with pytest.raises(ValueError, match=match) as e:
      call()
    assert "\n" not in str(e.value)
