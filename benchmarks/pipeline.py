"""Images/s of the ImageNet-style training pipeline, against torchvision's loader.

Both read the same folder of ImageNet-sized JPEGs (~500x375; generated unless
--data_dir is given) and produce normalised 224x224 random-area crops with
random flips:

- ours: `pipelines.build_dataset("folder:DIR", "train", ..., training=True)`;
- torchvision: `ImageFolder` + `RandomResizedCrop(224)` + flip + `ToTensor` +
  `Normalize` through `DataLoader(num_workers=2)`, shuffled.

In the same run, a row per later recipe's training view (issue 13), ours
through `build_dataset`'s options and, for torchvision_v2, torchvision's own:

- torchvision_v2: 176 crop, TrivialAugment-wide, random erasing 0.1, mixup
  0.2 or cutmix 1.0 per batch (torchvision: `v2.RandomChoice` of `v2.MixUp`
  and `v2.CutMix` in the collate function, as its reference scripts);
- rsb_a3: 160 crop, RandAugment rand-m6-mstd0.5-inc1, mixup 0.1 or cutmix 1.0.

Repeated augmentation only reorders keys, so it is left out.

And the floor (issue 14): read + `decode_and_crop_jpeg` of a random window
drawn as the paper's crop is (8-100% of the area, aspect 3/4-4/3) + one
bilinear resize to 224, batched, nothing else; the paper view's share of it
says what our bookkeeping, bicubic resize, flip and normalisation cost.

`--breakdown` instead times the floor, the floor plus each step of ours
alone (BREAKDOWN_STEPS), the floor plus all of them, and ours, in
interleaved rounds, and prints each step's CPU ms per image over the floor's.

torchvision runs in this interpreter when it is importable, otherwise in
--torch_python (e.g. a separate PyTorch virtualenv). The script prints both
figures (median of --repeats alternating runs) and their ratio, as images/s
and as CPU time per image; the latter is steadier on a shared machine.

    python benchmarks/pipeline.py --torch_python /work/torchvenv/bin/python
    python benchmarks/pipeline.py --breakdown
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

if not __package__:  # run as `python benchmarks/pipeline.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from machine import keep_per_cpu, print_cpu
else:
    from benchmarks.machine import keep_per_cpu, print_cpu

GENERATED_IMAGE_SIZE = (500, 375)  # width, height: a typical ImageNet photo.
GENERATED_CLASSES = 10

# `pipelines.build_dataset` options of each recipe's training view.
RECIPE_VIEWS = {
    "paper": dict(image_size=224),
    "torchvision_v2": dict(image_size=176, auto_augment="trivial_augment_wide",
                           random_erasing=0.1, mixup_alpha=0.2, cutmix_alpha=1.0),
    "rsb_a3": dict(image_size=160, auto_augment="rand-m6-mstd0.5-inc1",
                   mixup_alpha=0.1, cutmix_alpha=1.0),
}
RECIPE_VIEW_NAMES = {
    "paper": "paper view (224 crop, flip)",
    "torchvision_v2": "torchvision_v2 view (176, TrivialAugment-wide, erasing 0.1, mixup/cutmix)",
    "rsb_a3": "rsb_a3 view (160, rand-m6-mstd0.5-inc1, mixup/cutmix)",
}
TORCHVISION_VIEWS = ("paper", "torchvision_v2")


def generate_images(root, num_images, seed=0):
    """`root/train/<class>/*.JPEG`: textured photo-like JPEGs of ~500x375.

    Smooth colour fields plus fine noise, so that files (~90 KB) are nearer
    ImageNet's (~110 KB) in size and decoding cost than flat or pure-noise ones.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = GENERATED_IMAGE_SIZE
    for index in range(num_images):
        class_directory = os.path.join(root, "train", f"class_{index % GENERATED_CLASSES:02d}")
        os.makedirs(class_directory, exist_ok=True)
        # Jitter the size a little, as real photos vary.
        image_width = width + int(rng.integers(-40, 41))
        image_height = height + int(rng.integers(-40, 41))
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(
            Image.fromarray(coarse).resize((image_width, image_height), Image.BICUBIC),
            dtype=np.float32,
        )
        detail = rng.normal(0.0, 18.0, (image_height, image_width, 3))
        pixels = np.clip(field + detail, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(
            os.path.join(class_directory, f"image_{index:05d}.JPEG"), quality=90
        )


def folder_stats(root):
    sizes = [
        os.path.getsize(os.path.join(directory, name))
        for directory, _, names in os.walk(os.path.join(root, "train"))
        for name in names
    ]
    return len(sizes), sum(sizes) / max(len(sizes), 1)


def cpu_seconds(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure(batches, batch_size, warmup_batches, timed_batches):
    """(images/s, CPU ms/image) of a finite iterable of batches.

    Images/s is timed over the `timed_batches` after `warmup_batches`. CPU
    time covers every batch, start-up included, and counts this process and
    its finished children (DataLoader's workers), so it compares loaders
    fairly even on a busy machine.
    """
    cpu_start = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)
    iterator = iter(batches)
    for _ in range(warmup_batches):
        next(iterator)
    start = time.perf_counter()
    for _ in range(timed_batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    for _ in iterator:  # The end lets DataLoader join its workers, so they count.
        pass
    cpu = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_start
    return (timed_batches * batch_size / elapsed,
            1000 * cpu / ((warmup_batches + timed_batches) * batch_size))


def tf_data_dataset(root, batch_size, num_batches, view="paper"):
    import pipelines

    return pipelines.build_dataset(
        f"folder:{root}", "train", batch_size=batch_size, training=True,
        **RECIPE_VIEWS[view],
    ).repeat().take(num_batches)


# `--breakdown`: each of our steps alone on top of the floor, so that its cost
# per image is the row's CPU time less the floor's.
BREAKDOWN_STEPS = {
    "seeded_crop": "our crop window: per-element seeds (Dataset.random), stateless "
                   "sampler, centre-square fallback, JPEG/other-format branch",
    "flip": "random horizontal flip of the uint8 crop",
    "bicubic": "our resize (bicubic, pixels as float32) instead of bilinear",
    "bookkeeping": "unreadable-file table (insert/remove per file), ignore_errors, "
                   "end-of-pass report",
    "label_check": "label range check, per batch",
    "normalise": "preprocess_input per image, in the parallel map (ours)",
    "normalise_per_batch": "preprocess_input per batch, in a map after batching "
                           "(ours until issue 14)",
    "pass_restart": "the pipeline rebuilt at each pass (ours is repeated outside "
                    "build_dataset)",
}

OUR_STEPS = tuple(step for step in BREAKDOWN_STEPS if step != "normalise_per_batch")


def floor_dataset(root, batch_size, num_batches, image_size=224, seed=0, steps=()):
    """The least a tf.data training input can do with these files.

    With `steps` (keys of BREAKDOWN_STEPS), the floor plus those steps of
    `pipelines.build_dataset`'s training view, each done as build_dataset does it.
    """
    import glob

    import tensorflow as tf

    from keras_resnext.preprocessing import preprocess_input
    from pipelines import dataset as pipeline_dataset
    from pipelines import imagenet

    files = sorted(glob.glob(os.path.join(root, "train", "*", "*")))
    class_names = sorted(os.listdir(os.path.join(root, "train")))
    num_classes = len(class_names)
    labels = [class_names.index(os.path.basename(os.path.dirname(path))) for path in files]
    unreadable = pipeline_dataset.UnreadableFiles("breakdown")

    def crop(data, element_seed):
        if "seeded_crop" in steps:
            crop_seed = tf.random.experimental.stateless_split(element_seed, num=4)[0]
            return imagenet.decode_random_crop(data, crop_seed)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.io.extract_jpeg_shape(data), bounding_boxes=tf.zeros([1, 0, 4]),
            area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.io.decode_and_crop_jpeg(data, window, channels=3)

    def load(path, element_seed):
        image = crop(tf.io.read_file(path), element_seed)
        if "flip" in steps:
            image = tf.image.stateless_random_flip_left_right(image, element_seed)
        if "bicubic" in steps:
            image = imagenet.resize_crop(image, image_size)
        else:
            image = tf.image.resize(image, [image_size, image_size])
        if "normalise" in steps:
            image = preprocess_input(image)
        return image

    def load_element(path, label, element_seed=None):
        if "bookkeeping" in steps:
            with tf.control_dependencies([unreadable.started(path)]):
                image = load(path, element_seed)
            with tf.control_dependencies([unreadable.finished(path, after=image)]):
                image = tf.identity(image)
        else:
            image = load(path, element_seed)
        if "label_check" in steps:
            return path, image, label
        return image, label

    records = tf.data.Dataset.from_tensor_slices((files, labels)).shuffle(len(files), seed=seed)
    if "pass_restart" not in steps:
        records = records.repeat()
    if "seeded_crop" in steps or "flip" in steps:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        records = tf.data.Dataset.zip(records, seeds)
        function = lambda record, element_seed: load_element(*record, element_seed)  # noqa: E731
    else:
        function = load_element
    examples = records.map(function, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    if "bookkeeping" in steps:
        examples = examples.ignore_errors()
        examples = examples.concatenate(unreadable.report_at_end(examples.element_spec))
    dataset = examples.batch(batch_size, drop_remainder=True)
    if "label_check" in steps:
        dataset = dataset.map(
            lambda paths, images, batch_labels: pipeline_dataset._check_labels(
                paths, images, batch_labels, num_classes),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    if "normalise_per_batch" in steps:
        dataset = dataset.map(lambda images, labels: (preprocess_input(images), labels),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    if "pass_restart" in steps:
        dataset = dataset.repeat()
    return dataset.take(num_batches)


class MixOrCutCollate:
    """torchvision's reference collate for the V2 recipe: mixup or cutmix per batch."""

    def __init__(self, num_classes, mixup_alpha, cutmix_alpha):
        from torchvision.transforms import v2

        self.mix = v2.RandomChoice([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes),
                                    v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)])

    def __call__(self, batch):
        from torch.utils.data import default_collate

        return self.mix(*default_collate(batch))


def torchvision_loader(root, batch_size, num_batches, num_workers, view="paper"):
    """torchvision's ImageNet training input of a view, for `num_batches` batches."""
    import torch
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    collate = None
    if view == "paper":
        transform = transforms.Compose([
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ])
    else:  # torchvision_v2, as references/classification/presets.py builds it.
        options = RECIPE_VIEWS[view]
        transform = transforms.Compose([
            transforms.RandomResizedCrop(options["image_size"]),
            transforms.RandomHorizontalFlip(),
            transforms.TrivialAugmentWide(),
            transforms.PILToTensor(),
            transforms.ConvertImageDtype(torch.float),
            normalize,
            transforms.RandomErasing(p=options["random_erasing"]),
        ])
        collate = MixOrCutCollate(GENERATED_CLASSES, options["mixup_alpha"],
                                  options["cutmix_alpha"])
    dataset = datasets.ImageFolder(os.path.join(root, "train"), transform=transform)
    # One long epoch (a shuffle as DataLoader(shuffle=True) does, repeated as
    # needed), so that the workers start once and are joined at the end.
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=num_batches * batch_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        drop_last=True, collate_fn=collate,
    )


def torchvision_importable():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def measure_torchvision(args, view="paper"):
    """torchvision's (images/s, CPU ms/image) of a view, here or in
    --torch_python; None if neither has torchvision."""
    if torchvision_importable():
        loader = torchvision_loader(
            args.data_dir, args.batch_size, args.warmup_batches + args.timed_batches,
            args.torch_workers, view,
        )
        return measure(loader, args.batch_size, args.warmup_batches, args.timed_batches)
    if not args.torch_python:
        return None
    command = [
        args.torch_python, os.path.abspath(__file__), "--only_torchvision",
        "--data_dir", args.data_dir, "--batch_size", str(args.batch_size),
        "--warmup_batches", str(args.warmup_batches),
        "--timed_batches", str(args.timed_batches),
        "--torch_workers", str(args.torch_workers), "--view", view,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"torchvision benchmark in {args.torch_python} failed:\n{completed.stderr}"
        )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return result["images_per_second"], result["cpu_ms_per_image"]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", help="folder with train/<class>/*.JPEG; generated if absent")
    parser.add_argument("--num_images", type=int, default=1000,
                        help="images to generate when --data_dir is not given")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--warmup_batches", type=int, default=5)
    parser.add_argument("--timed_batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating measurements of each; medians are printed")
    parser.add_argument("--torch_workers", type=int, default=2)
    parser.add_argument("--torch_python", help="interpreter with torchvision, if not this one")
    parser.add_argument("--results_dir",
                        help="also keep the medians in DIR/pipeline_<cpu>.json, one entry "
                             "per mode (comparison, breakdown), replaced by a rerun")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: the floor, the floor plus each of our steps, and ours, "
                             "as CPU ms per image")
    parser.add_argument("--only_torchvision", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--view", default="paper", choices=TORCHVISION_VIEWS,
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.only_torchvision:
        images_per_second, cpu_ms_per_image = measure_torchvision(args, args.view)
        print(json.dumps({"images_per_second": images_per_second,
                          "cpu_ms_per_image": cpu_ms_per_image}))
        return
    print_cpu()
    with tempfile.TemporaryDirectory() as scratch:
        if not args.data_dir:
            args.data_dir = scratch
            generate_images(scratch, args.num_images)
        count, mean_bytes = folder_stats(args.data_dir)
        print(f"{count} JPEGs in {args.data_dir}, {mean_bytes / 1024:.0f} KB on average; "
              f"batch {args.batch_size}, {args.timed_batches} timed batches x "
              f"{args.repeats} repeats, {os.cpu_count()} CPUs")
        if args.breakdown:
            breakdown(args)
            return
        datasets = {
            view: tf_data_dataset(args.data_dir, args.batch_size,
                                  args.warmup_batches + args.timed_batches, view)
            for view in RECIPE_VIEWS
        }
        floor = floor_dataset(args.data_dir, args.batch_size,
                              args.warmup_batches + args.timed_batches)
        ours = {view: [] for view in RECIPE_VIEWS}
        theirs = {view: [] for view in TORCHVISION_VIEWS}
        floors = []
        # Alternate them all, so that a busy spell on the machine hits each.
        for _ in range(args.repeats):
            floors.append(measure(floor, args.batch_size, args.warmup_batches,
                                  args.timed_batches))
            for view in TORCHVISION_VIEWS:
                theirs[view].append(measure_torchvision(args, view))
            for view, dataset in datasets.items():
                ours[view].append(measure(dataset, args.batch_size, args.warmup_batches,
                                          args.timed_batches))
    for name, runs in [(f"tf.data {view}", ours[view]) for view in ours] + [
            (f"torchvision {view}", theirs[view]) for view in theirs]:
        if runs[0] is not None:
            print(f"{name} runs: " + ", ".join(f"{rate:.0f}/s {cpu:.1f}ms" for rate, cpu in runs))
    print("floor runs: " + ", ".join(f"{rate:.0f}/s {cpu:.1f}ms" for rate, cpu in floors))
    print_recipe_views(ours, theirs, args.torch_workers)
    tf_rate, tf_cpu = np.median(ours["paper"], axis=0)
    floor_rate, floor_cpu = np.median(floors, axis=0)
    print(f"floor (read + decode_and_crop_jpeg + bilinear resize): {floor_rate:7.1f} images/s, "
          f"{floor_cpu:5.1f} CPU ms/image")
    paired = np.median([o[0] / f[0] for o, f in zip(ours["paper"], floors)])
    print(f"tf.data (pipelines.build_dataset): {tf_rate:7.1f} images/s, "
          f"{tf_cpu:5.1f} CPU ms/image; {tf_rate / floor_rate:.0%} of the floor's images/s "
          f"(paired by round: {paired:.0%})")
    medians = {"floor": dict(images_per_second=floor_rate, cpu_ms_per_image=floor_cpu)}
    for view, runs in ours.items():
        rate, cpu = np.median(runs, axis=0)
        medians[f"tf.data {view}"] = dict(images_per_second=rate, cpu_ms_per_image=cpu)
    medians["tf.data paper"]["of_floor_paired"] = paired
    for view, runs in theirs.items():
        if runs[0] is not None:
            rate, cpu = np.median(runs, axis=0)
            medians[f"torchvision {view}"] = dict(images_per_second=rate, cpu_ms_per_image=cpu)
    save_results(args, "comparison", medians)
    if theirs["paper"][0] is None:
        print("torchvision: not importable here and no --torch_python given")
        return
    torch_rate, torch_cpu = np.median(theirs["paper"], axis=0)
    print(f"torchvision DataLoader({args.torch_workers} workers): {torch_rate:7.1f} images/s, "
          f"{torch_cpu:5.1f} CPU ms/image")
    print(f"ratio: {tf_rate / torch_rate:.2f}x images/s, "
          f"{torch_cpu / tf_cpu:.2f}x less CPU per image")


def breakdown(args):
    """The floor, the floor plus each step of ours alone, and ours, in
    interleaved rounds; a step's cost is its row's CPU time less the floor's."""
    num_batches = args.warmup_batches + args.timed_batches
    rows = {"floor": floor_dataset(args.data_dir, args.batch_size, num_batches)}
    for step in BREAKDOWN_STEPS:
        rows[f"floor + {step}"] = floor_dataset(args.data_dir, args.batch_size, num_batches,
                                                steps=(step,))
    rows["floor + all of ours"] = floor_dataset(args.data_dir, args.batch_size, num_batches,
                                                steps=OUR_STEPS)
    rows["ours (build_dataset, paper view)"] = tf_data_dataset(
        args.data_dir, args.batch_size, num_batches)
    runs = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, dataset in rows.items():
            runs[name].append(measure(dataset, args.batch_size, args.warmup_batches,
                                      args.timed_batches))
    floor_rate, floor_cpu = np.median(runs["floor"], axis=0)
    medians = {}
    print(f"{'row (medians of ' + str(args.repeats) + ' rounds)':42s} {'images/s':>9s} "
          f"{'of floor':>8s} {'CPU ms/img':>10s} {'step ms/img':>11s}")
    for name, measured in runs.items():
        rate, cpu = np.median(measured, axis=0)
        # Paired by round, so that a busy spell hits the floor and the row alike.
        paired = np.median([row[0] / floor[0] for row, floor in zip(measured, runs["floor"])])
        step_cost = "" if name == "floor" else f"{cpu - floor_cpu:+11.2f}"
        print(f"{name:42s} {rate:9.0f} {paired:8.0%} {cpu:10.2f} {step_cost}")
        medians[name] = dict(images_per_second=rate, of_floor_paired=paired,
                             cpu_ms_per_image=cpu, step_cpu_ms_per_image=cpu - floor_cpu)
    for step, description in BREAKDOWN_STEPS.items():
        print(f"  {step}: {description}")
    save_results(args, "breakdown", medians)


def save_results(args, mode, medians):
    """Keep `medians` in --results_dir/pipeline_<cpu>.json under `mode`,
    replacing that mode's earlier run on this CPU."""
    if not args.results_dir:
        return
    path = keep_per_cpu(args.results_dir, "pipeline", mode, dict(
        cores=os.cpu_count(),
        # Other work on the machine shows here; a loaded run's images/s mean less.
        load_average_at_end=os.getloadavg()[0],
        medians=medians,
    ))
    print(f"results: {path}")


def print_recipe_views(ours, theirs, torch_workers):
    """A row per recipe view: medians of ours and, where measured, torchvision's."""
    print("recipe views (medians):")
    for view, runs in ours.items():
        rate, cpu = np.median(runs, axis=0)
        print(f"  tf.data {RECIPE_VIEW_NAMES[view]}: {rate:7.1f} images/s, "
              f"{cpu:5.1f} CPU ms/image")
        if view in theirs and theirs[view][0] is not None:
            torch_rate, torch_cpu = np.median(theirs[view], axis=0)
            print(f"  torchvision DataLoader({torch_workers} workers), same view: "
                  f"{torch_rate:7.1f} images/s, {torch_cpu:5.1f} CPU ms/image "
                  f"(ours {rate / torch_rate:.2f}x images/s)")


if __name__ == "__main__":
    main()
