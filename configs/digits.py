"""The offline demo: scikit-learn's bundled 8×8 digits at their native size, a small U-Net, ~10 minutes on 2 CPU cores.

Run:  python main.py --config=configs/digits.py --workdir=runs/digits
Needs no download and no accelerator. Sample grids land in runs/digits/samples/; TensorBoard reads runs/digits.
The diffusion is the paper's (T = 1000, linear β, ε-prediction, L_simple); only the data, model size and optimizer
schedule are scaled down. Measured on 2 CPU cores: 10.4 minutes for the whole command; then
`--mode=eval` reports FID 19.7 for 256 samples against a floor of 14.3 (256 real digits), and 80% of the samples
read as a digit with p ≥ 0.9 by a classifier of the real digits (96% of real digits are): docs/evaluation.md.
"""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.data.source = "digits"  # scikit-learn's load_digits: 1,797 images, no download.
  config.data.name = "digits"
  # Native 8×8: upsampling to 16×16 adds no information and makes each step ~3× dearer (0.42 s vs 0.14 s on 2
  # cores), so 10 minutes buy ~3,000 steps here instead of ~900 at 16×16.
  config.data.image_size = 8
  config.data.channels = 1  # Grayscale.
  config.data.random_flip = False  # Digits are not mirror-symmetric.

  config.model.ch = 32  # 1.1M params instead of 35.7M.
  config.model.ch_mult = (1, 2, 2)  # 8, 4, 2.
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)  # Self-attention at 4×4, the middle level (as 16 of the paper's 32).
  config.model.dropout = 0.0  # Too few steps to overfit.

  config.optim.lr = 1e-3  # Higher than the paper's 2e-4: a few thousand steps instead of 800k.
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.999  # An EMA horizon of ~1,000 steps: the last third of the run.

  config.training.batch_size = 64
  config.training.num_train_steps = 3000  # ~7 min at ~7 steps/s on 2 idle cores, + compile and the final grid.
  config.training.log_every_steps = 100
  config.training.checkpoint_every_steps = 1000
  config.training.sample_every_steps = 3000  # One grid at the end (1000 reverse steps for 64 samples: ~50 s here).
  config.training.num_grid_samples = 64

  config.sampling.num_samples = 256
  config.sampling.batch_size = 128

  config.eval.num_samples = 256  # FID of the demo against all 1797 digits (the chain is the slow part on a CPU).
  config.eval.bpd_num_examples = 64  # Bits/dim of the first 64 digits (digits has no test split).
  config.eval.bpd_batch_size = 64

  config.distill.start_steps = 64  # 64-step DDIM → students of 32, 16, 8, 4 and 2 steps.
  config.distill.end_steps = 2
  config.distill.steps_per_round = 1000
  config.distill.lr = 2e-4
  config.distill.ema_decay = 0.995  # e^-5 ≈ 0.7% of the teacher's params left in the EMA after 1,000 steps
  return config
