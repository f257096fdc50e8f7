"""`reformulate`: the same network in another of Fig. 3's block forms.

Weights travel through form c's layout. Path i of a form a/b block with width
d per path owns a slice of form c's layers: output channels [i*d, (i+1)*d) of
`_1_conv`/`_1_bn` and `_2_bn`, group i of `_2_conv`, and (form a only) input
channels [i*d, (i+1)*d) of `_3_conv`, by footnote 3's A1 B1 + A2 B2 = [A1, A2][B1; B2].
"""

import re

import numpy as np

from keras_resnext.models import ResNeXt

_PATH_LAYER = re.compile(
    r"^(?P<block>conv\d+_block\d+)_path(?P<path>\d+)_(?P<part>[123])_(?P<kind>conv|bn)$"
)


def reformulate(model, block_form):
    """A new model of `model`'s architecture in `block_form`, the same function."""
    if not isinstance(model, ResNeXt):
        raise TypeError(
            f"reformulate takes a model built by keras_resnext; got {type(model).__name__}."
        )
    config = model.get_config()
    config["block_form"] = block_form
    new_model = ResNeXt.from_config(config)
    form_c_weights = _to_form_c(model)
    for layer in new_model.layers:
        if not layer.weights:
            continue
        match = _PATH_LAYER.match(layer.name)
        if match is None:
            layer.set_weights(form_c_weights[layer.name])
        else:
            source = form_c_weights[_form_c_name(match)]
            path = int(match["path"]) - 1
            layer.set_weights(
                [_slice_path(t, path, model.cardinality, match["part"]) for t in source]
            )
    return new_model


def _form_c_name(match):
    return f"{match['block']}_{match['part']}_{match['kind']}"


def _split_axis(tensor, part):
    # Kernels are [kh, kw, in, out]: the last 1x1 of form a splits its inputs.
    return 2 if tensor.ndim == 4 and part == "3" else tensor.ndim - 1


def _slice_path(tensor, path, cardinality, part):
    return np.split(tensor, cardinality, axis=_split_axis(tensor, part))[path]


def _to_form_c(model):
    """Every weighted layer's weights, under form c's layer names."""
    weights = {}
    paths = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        match = _PATH_LAYER.match(layer.name)
        if match is None:
            weights[layer.name] = layer.get_weights()
        else:
            paths.setdefault(_form_c_name(match), {})[int(match["path"])] = (
                match["part"], layer.get_weights()
            )
    for name, by_path in paths.items():
        ordered = [by_path[i] for i in sorted(by_path)]
        part = ordered[0][0]
        weights[name] = [
            np.concatenate(
                [tensors[i] for _, tensors in ordered],
                axis=_split_axis(ordered[0][1][i], part),
            )
            for i in range(len(ordered[0][1]))
        ]
    return weights
