"""LSUN church 256×256, the paper's setup (Table 3 FID 7.89): the CelebA-HQ recipe with 1,200,000 steps.

Run:  python main.py --config=configs/lsun_church.py --workdir=gs://BUCKET/ddpm/lsun_church
Meant for a TPU v3-8 or larger (paper: 2.2 steps/s at batch 64 on a v3-8). tfds' lsun/church_outdoor must be prepared in
data.data_dir first.
"""
from configs import celebahq256


def get_config():
  config = celebahq256.get_config()
  config.data.name = "lsun/church_outdoor"  # tfds LSUN category.
  config.data.random_flip = True  # Paper: flips for every data set except LSUN bedroom.
  config.training.num_train_steps = 1_200_000  # Paper's training length for this category.
  return config
