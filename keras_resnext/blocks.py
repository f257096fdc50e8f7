"""The ResNeXt residual block and the paper's three equivalent forms (Fig. 3).

Every form computes y = relu(shortcut(x) + BN(sum_i T_i(x))) (Eq. 3), with
T_i = 1x1 -> 3x3 -> 1x1 of width d per path and C paths:

- form "a": C separate paths whose 1x1 outputs are summed, BN after the sum
  (footnote 6);
- form "b": C paths of 1x1 -> 3x3, concatenated, then one 1x1;
- form "c": one 1x1, a 3x3 with C groups, one 1x1 (what the paper trains).

BN is per channel, so the per-path BNs of forms a and b are slices of form c's
BNs: the forms are the same function in inference and in training mode.
"""

import keras
from keras import layers

# Ours for the grouped conv and for the BN and ReLU after a conv: on
# TensorFlow the grouped conv runs without XLA, and at inference the BN and
# ReLU after it fold into our AVX2 op. Keras' own layers everywhere else.
from keras_resnext import layers as resnext_layers

BN_EPSILON = 1e-5
# PyTorch's momentum 0.1 in Keras' convention. Keras' default 0.99 leaves the
# moving statistics far behind the weights in short runs.
BN_MOMENTUM = 0.9
BOTTLENECK_EXPANSION = 4


def conv_initializer():
    # He et al. 2015 as in fb.resnet.torch and torchvision: N(0, 2 / fan_out).
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


def batch_norm(name, gamma_initializer="ones"):
    return resnext_layers.BatchNormalization(
        axis=-1, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, gamma_initializer=gamma_initializer,
        name=name,
    )


def conv(x, filters, kernel_size, stride, name, groups=1, dilation=1):
    """A bias-free conv with PyTorch's symmetric padding (explicit pad + valid)."""
    if kernel_size > 1:
        x = layers.ZeroPadding2D(dilation * (kernel_size // 2), name=f"{name}_pad")(x)
    # Ours for dilated ungrouped convs too: TensorFlow's CPU kernels without
    # oneDNN can't differentiate Keras' dilated Conv2D (see tf_ops).
    grouped_or_dilated = groups > 1 or dilation > 1
    conv_class = resnext_layers.GroupConv2D if grouped_or_dilated else layers.Conv2D
    return conv_class(
        filters,
        kernel_size,
        strides=stride,
        padding="valid",
        groups=groups,
        dilation_rate=dilation,
        use_bias=False,
        kernel_initializer=conv_initializer(),
        name=f"{name}_conv",
    )(x)


def conv_bn(x, filters, kernel_size, stride, name, groups=1, relu=True, dilation=1,
            gamma_initializer="ones"):
    x = conv(x, filters, kernel_size, stride, name, groups=groups, dilation=dilation)
    x = batch_norm(f"{name}_bn", gamma_initializer)(x)
    if relu:
        x = resnext_layers.ReLU(name=f"{name}_relu")(x)
    return x


def aggregated_paths_form_a(x, cardinality, path_width, out_channels, stride, dilation,
                            last_gamma, name):
    paths = []
    for i in range(1, cardinality + 1):
        path = conv_bn(x, path_width, 1, 1, f"{name}_path{i}_1")
        path = conv_bn(path, path_width, 3, stride, f"{name}_path{i}_2", dilation=dilation)
        paths.append(conv(path, out_channels, 1, 1, f"{name}_path{i}_3"))
    y = layers.Add(name=f"{name}_sum")(paths) if cardinality > 1 else paths[0]
    return batch_norm(f"{name}_3_bn", last_gamma)(y)


def aggregated_paths_form_b(x, cardinality, path_width, out_channels, stride, dilation,
                            last_gamma, name):
    paths = []
    for i in range(1, cardinality + 1):
        path = conv_bn(x, path_width, 1, 1, f"{name}_path{i}_1")
        paths.append(conv_bn(path, path_width, 3, stride, f"{name}_path{i}_2",
                             dilation=dilation))
    y = layers.Concatenate(name=f"{name}_concat")(paths) if cardinality > 1 else paths[0]
    return conv_bn(y, out_channels, 1, 1, f"{name}_3", relu=False, gamma_initializer=last_gamma)


def aggregated_paths_form_c(x, cardinality, path_width, out_channels, stride, dilation,
                            last_gamma, name):
    group_width = cardinality * path_width
    y = conv_bn(x, group_width, 1, 1, f"{name}_1")
    y = conv_bn(y, group_width, 3, stride, f"{name}_2", groups=cardinality, dilation=dilation)
    return conv_bn(y, out_channels, 1, 1, f"{name}_3", relu=False, gamma_initializer=last_gamma)


BLOCK_FORMS = {
    "a": aggregated_paths_form_a,
    "b": aggregated_paths_form_b,
    "c": aggregated_paths_form_c,
}


def bottleneck(x, filters, cardinality, width, stride, block_form, name, dilation=1,
               drop_path_rate=0.0, zero_init_last=False):
    """One ResNeXt bottleneck block with `filters * 4` output channels.

    The per-group width follows torchvision's `int(filters * width / 64)`, so a
    C x d template gets C * d group-conv channels at conv2 and doubles with
    each stage (§3.1, rule ii), and weights line up with torchvision and timm.
    `dilation` applies to the 3x3 (padded by as much, as torchvision's);
    `drop_path_rate` drops the residual branch per example before the sum
    (stochastic depth); `zero_init_last` starts the branch's last BN gamma at
    0, so the fresh block is its shortcut (followed by the ReLU).
    """
    out_channels = filters * BOTTLENECK_EXPANSION
    path_width = int(filters * width / 64)
    if path_width < 1:
        raise ValueError(
            f"width={width} gives {filters} * {width} / 64 < 1 channel per group "
            f"in {name}; use a larger width."
        )
    shortcut = x
    if stride != 1 or x.shape[-1] != out_channels:
        # Projection shortcut (type B) only where the shape changes.
        shortcut = conv_bn(x, out_channels, 1, stride, f"{name}_0", relu=False)
    last_gamma = "zeros" if zero_init_last else "ones"
    y = BLOCK_FORMS[block_form](x, cardinality, path_width, out_channels, stride, dilation,
                                last_gamma, name)
    if drop_path_rate > 0:
        y = resnext_layers.DropPathAdd(drop_path_rate, name=f"{name}_add")([shortcut, y])
    else:
        y = layers.Add(name=f"{name}_add")([shortcut, y])
    # After the sum there is no convolution to fold into: Keras' ReLU.
    return layers.ReLU(name=f"{name}_out")(y)
