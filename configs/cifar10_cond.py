"""Class-conditional CIFAR-10: the paper's setup with a label embedding and classifier-free guidance (Ho & Salimans
2021); not a configuration of the DDPM paper, whose models are unconditional.

Run:  python main.py --config=configs/cifar10_cond.py --workdir=gs://BUCKET/ddpm/cifar10_cond
Labels come from tfds' 'label' feature (data.label_key). Everything else is configs/cifar10.py.
"""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.num_classes = 10  # CIFAR-10's classes; the label embedding adds 11 × 512 parameters.
  config.model.class_dropout = 0.1  # Ho & Salimans' p_uncond: one label in ten trained as "null".
  config.sampling.guidance_scale = 1.0  # w; 0 samples the conditional model unguided.
  config.sampling.labels = ()  # Every class in turn: sample i is class i mod 10, balanced classes for FID.
  config.training.num_grid_samples = 100  # Ten of each class, one column per class.
  return config
