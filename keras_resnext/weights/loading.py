"""`load_weights`: a weights file into a built model, checked before anything is assigned.

PyTorch and safetensors files describe form c (see `names`); a form a or b
model is loaded through a form-c twin and `reformulate`.

Nothing is half-loaded: every tensor is checked against the model before the
first one is assigned.
"""

import warnings

from keras_resnext.models import ResNeXt, default_name
from keras_resnext.reformulate import reformulate
from keras_resnext.weights import catalog, fetch, names, readers

_LISTED = 12


def load_weights(model, weights):
    """Load `weights` into `model`, or raise naming the problem.

    `weights` is a file path, a weights name ("imagenet", "IMAGENET1K_V1"), an
    http(s):// or file:// URL, or hf://OWNER/REPO (see `fetch`); downloads are
    cached.
    """
    _require_resnext(model)
    return load_source(model, fetch.resolve(weights, architecture_of(model)))


def load_source(model, source):
    """Load a `fetch.WeightsSource` into `model`. Where the source publishes
    its eval transform and `model` records none, `model` records it."""
    path = readers.weights_path(source.local_path())
    file_format = readers.detect_format(path)
    if file_format == readers.KERAS:
        loaded = _load_keras_in_place(model, path)
        if not loaded:
            load_tensors(model, readers.read_keras(path, model))
    else:
        load_tensors(model, readers.read_torch_layout(path, file_format))
    if source.eval_transform is not None and model.eval_transform is None:
        model.eval_transform = source.eval_transform
    return model


def _load_keras_in_place(model, path):
    """Load a `.weights.h5` saved from `model`'s own architecture and head
    straight into it, the common case, without building a twin. False when the
    file's head or number of tensors differ (another head or block form)."""
    _require_resnext(model)
    classes, file_tensors = readers.keras_file_summary(path)
    if classes != (model.classes if model.include_top else None):
        return False
    if len(model.weights) != file_tensors:
        return False
    snapshot = [variable.numpy() for variable in model.weights]
    failure = readers.keras_load(model, path)
    if failure is None:
        return True
    for variable, value in zip(model.weights, snapshot):
        variable.assign(value)
    raise ValueError(f"{path} does not fit {model.name}; nothing was loaded: {failure}")


def architecture_of(model):
    """`model`'s preset name where weights may be published for it, else None."""
    return catalog.architecture_name(model.stem, model.stage_depths, model.cardinality,
                                     model.width)


def _require_resnext(model):
    if not isinstance(model, ResNeXt):
        raise TypeError(
            f"keras_resnext loads weights into its own models; got {type(model).__name__}."
        )


def load_tensors(model, checkpoint):
    """Assign `checkpoint` to `model`, through a twin of the checkpoint's block
    form if it is another, after checking that every tensor fits."""
    _require_resnext(model)
    tensors, head_warning = _fit_head(model, checkpoint)
    target = model
    if checkpoint.block_form != model.block_form:
        target = ResNeXt.from_config(dict(model.get_config(), block_form=checkpoint.block_form))
    _check_fits(target, checkpoint, tensors)
    if head_warning:
        warnings.warn(head_warning, stacklevel=4)
    _assign(target, tensors)
    if target is not model:
        reformulated = reformulate(target, model.block_form)
        for layer in model.layers:
            if layer.weights:
                layer.set_weights(reformulated.get_layer(layer.name).get_weights())


def _fit_head(model, checkpoint):
    """The tensors to load, the file's classifier only where `model` takes it,
    and a warning to give when the classifier is left out."""
    tensors = dict(checkpoint.tensors)
    if not model.include_top:
        tensors.pop("predictions", None)
        return tensors, None
    if checkpoint.classes is None:
        return tensors, (
            f"{checkpoint.path} has no classifier; {model.name}'s 'predictions' layer "
            f"keeps its fresh initialisation."
        )
    if checkpoint.classes != model.classes:
        tensors.pop("predictions")
        return tensors, (
            f"{checkpoint.path} has a {checkpoint.classes}-class classifier and "
            f"{model.name} {model.classes} classes: the classifier was not loaded and "
            f"keeps its fresh initialisation (for fine-tuning)."
        )
    return tensors, None


def _check_fits(model, checkpoint, tensors):
    """Raise, listing every problem, unless `tensors` fill `model` exactly."""
    targets = {layer.name: layer.weights for layer in model.layers if layer.weights}
    skipped_head = "predictions" in targets and "predictions" not in tensors
    missing, mismatched = [], []
    for layer, variables in targets.items():
        if layer == "predictions" and skipped_head:
            continue
        given = tensors.get(layer, {})
        for index, variable in enumerate(variables):
            if index not in given:
                missing.append(_file_name(checkpoint, layer, index, variable))
            elif tuple(given[index].value.shape) != tuple(variable.shape):
                mismatched.append(_shape_mismatch(given[index], variable))
    unexpected = list(checkpoint.unmatched)
    for layer, given in tensors.items():
        count = len(targets.get(layer, ()))
        unexpected += [tensor.name for index, tensor in given.items() if index >= count]
    if not (missing or mismatched or unexpected):
        return
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} with other shapes: {_listing(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} missing from the file: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} in the file that {model.name} has no place "
                        f"for: {_listing(unexpected)}")
    holds = _describe(checkpoint)
    raise ValueError(
        f"{checkpoint.path} does not fit {model.name}; nothing was loaded. Tensors: "
        + "; ".join(problems) + "." + (f" The file holds {holds}." if holds else "")
    )


def _file_name(checkpoint, layer, index, variable):
    if checkpoint.naming == readers.TORCH:
        module = names.torch_module_for(layer)
        if module is not None:
            return f"{module}.{names.tensor_names(layer)[index]}"
    return variable.path


def _shape_mismatch(tensor, variable):
    if tensor.torch_layout:
        file_shape = names.torch_shape(tensor.value.shape)
        needed = names.torch_shape(variable.shape)
    else:
        file_shape, needed = tuple(tensor.value.shape), tuple(variable.shape)
    return f"{tensor.name} is {list(file_shape)} in the file, the model needs {list(needed)}"


def _listing(items):
    shown = ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _describe(checkpoint):
    """The architecture a torchvision-layout checkpoint holds, e.g. 'a resnext101_32x8d
    (...)', or None when its stem or first grouped conv isn't there to tell."""
    if checkpoint.naming != readers.TORCH:
        return None
    stem = checkpoint.tensors.get("conv1_conv", {}).get(0)
    group_conv = checkpoint.tensors.get("conv2_block1_2_conv", {}).get(0)
    if stem is None or group_conv is None or stem.value.ndim != 4 or group_conv.value.ndim != 4:
        return None
    blocks = {}
    for layer in checkpoint.tensors:
        match = names.KERAS_BLOCK_LAYER.fullmatch(layer)
        if match:
            blocks.setdefault(int(match["stage"]), set()).add(int(match["block"]))
    stage_depths = tuple(len(blocks[stage]) for stage in sorted(blocks))
    # Kernels are [kh, kw, in / groups, out]; conv2's groups are int(64 * d / 64) = d wide.
    width = group_conv.value.shape[2]
    cardinality = group_conv.value.shape[3] // width
    depth = 3 * sum(stage_depths) + 2
    kernel = stem.value.shape[0]
    stem_name = "ImageNet" if kernel == 7 else f"{kernel}x{kernel}"
    classes = checkpoint.classes
    return (
        f"a {default_name(depth, cardinality, width)} (stage depths {stage_depths}, "
        f"cardinality {cardinality}, width {width}, {stem_name} stem, "
        + (f"{classes} classes)" if classes else "no classifier)")
    )


def _assign(model, tensors):
    for layer in model.layers:
        if layer.name in tensors:
            given = tensors[layer.name]
            layer.set_weights([given[index].value for index in range(len(layer.weights))])
