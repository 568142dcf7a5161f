"""CelebA-HQ 256×256, the paper's setup: the 114M U-Net, lr 2e-5, batch 64, fixed-small variance, 0.5M steps.

Run:  python main.py --config=configs/celebahq256.py --workdir=gs://BUCKET/ddpm/celebahq256
Meant for a TPU v3-8 (paper: 2.2 steps/s at batch 64) or larger. tfds' celeb_a_hq must be built by hand
(manual download) into data.data_dir first.
"""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.data.name = "celeb_a_hq/256"  # tfds config '256' holds 256×256 images.
  config.data.image_size = 256
  config.data.random_flip = True  # Paper: random horizontal flips.
  config.data.num_threads = 8  # 256² images (JPEG for LSUN) to decode, resize and crop: a TPU host has the cores.

  config.model.ch_mult = (1, 1, 2, 2, 4, 4)  # 256, 128, 64, 32, 16, 8: the 113,673,219-param model.
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0  # Paper: no dropout at 256².

  config.diffusion.model_var_type = "fixedsmall"  # Paper: σ² = β̃_t for the 256² models.

  config.optim.lr = 2e-5  # Paper: 2e-5 at 256².

  config.training.batch_size = 64
  config.training.num_train_steps = 500_000  # Paper: 0.5M steps for CelebA-HQ.
  config.training.sample_every_steps = 50_000
  config.training.num_grid_samples = 16

  config.sampling.batch_size = 64
  return config
