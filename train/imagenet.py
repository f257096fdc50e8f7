"""Train or evaluate a ResNeXt with the paper's ImageNet recipe (§4).

    python train/imagenet.py --model_dir runs/r50 --strategy mirrored
    python train/imagenet.py --dataset imagenet2012 --manual_dir ~/ilsvrc --model_dir runs/x
    python train/imagenet.py --eval_only --weights r50.weights.h5 --dataset folder:/data/in1k
    python train/imagenet.py --eval_only --weights r50.weights.h5 --eval_view ten_crop ...
    python train/imagenet.py --eval_only --image_size 320 --resize_size 320 ...  # Table 5's 320

SGD with Nesterov momentum 0.9, batch 256 at lr 0.1 (scaled linearly with
the batch), coupled weight decay 1e-4, 100 epochs with lr /10 at 30, 60 and
90. Without --dataset it trains on TFDS imagenette/160px-v2. See --helpfull.
"""

import os
import sys

if not __package__:  # run as `python train/imagenet.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from train import common  # noqa: E402

common.define_flags("imagenet")
flags.adopt_module_key_flags(common)  # so --helpshort lists them

if __name__ == "__main__":
    common.main("imagenet")
