"""Train or evaluate a CIFAR ResNeXt with the official CIFAR recipe (§5.3).

    python train/cifar.py --model_dir runs/cifar10
    python train/cifar.py --dataset cifar100 --model resnext29_16x64d --model_dir runs/c100

ResNeXt-29 (8x64d by default); SGD with Nesterov momentum 0.9, batch 128 at
lr 0.1, coupled weight decay 5e-4, 300 epochs with lr /10 at 50% and 75%.
Without --dataset it trains on TFDS cifar10. See --helpfull.
"""

import os
import sys

if not __package__:  # run as `python train/cifar.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from train import common  # noqa: E402

common.define_flags("cifar")
flags.adopt_module_key_flags(common)  # so --helpshort lists them

if __name__ == "__main__":
    common.main("cifar")
