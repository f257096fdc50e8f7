"""The torchvision side of `parity_torchvision.py`; runs where torch is installed.

Builds torchvision's `MODEL` with random weights and randomised BatchNorm
statistics and affine parameters, and writes to OUT_DIR:
`MODEL.pth` and `MODEL.safetensors` (its state dict), `input.npy` (NCHW) and
`MODEL_logits.npy` (its fp32 eval-mode logits on that input).

    python benchmarks/torchvision_reference.py MODEL OUT_DIR [--batch 2] [--image_size 224]
"""

import argparse
import os

import numpy as np
import torch
import torchvision
from safetensors.torch import save_file


def randomised_model(name, seed):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    # Fresh BNs are the identity (gamma 1, beta 0, mean 0, var 1): randomise them
    # so that a wrong mapping of any BN tensor shows in the logits.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(1000)
        model.fc.bias.normal_(0.0, 0.1)
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out_dir")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = randomised_model(args.model, args.seed)
    state = model.state_dict()
    torch.save(state, os.path.join(args.out_dir, f"{args.model}.pth"))
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(args.out_dir, f"{args.model}.safetensors"))
    generator = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator)
    with torch.no_grad():
        logits = model(images)
    np.save(os.path.join(args.out_dir, "input.npy"), images.numpy())
    np.save(os.path.join(args.out_dir, f"{args.model}_logits.npy"), logits.numpy())
    print(f"torchvision {torchvision.__version__} {args.model}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
