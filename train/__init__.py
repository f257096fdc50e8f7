"""Command-line training front ends: `train/imagenet.py` and `train/cifar.py`."""
