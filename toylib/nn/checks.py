"""Input checks shared by layers: one clear error naming the layer's path.

A layer fed the wrong feature size should say where it sits in the model
(``model.blocks[2].mlp (Linear)``), what it expected and what came, instead
of letting ``dot_general`` or ``conv_general_dilated`` fail deep inside.
"""

from __future__ import annotations

from typing import Any

from toylib._core.calls import module_path

__all__ = ["check_features"]

WRONG_SHAPE = """\
{where}: expected input of shape {expected}, got {shape}.
Fix: {fix}
"""


def check_features(
    module: Any,
    shape: tuple[int, ...],
    features: int,
    *,
    name: str = "in_features",
    axis: int = -1,
    spatial: int = 0,
) -> None:
    """Raise a ValueError unless ``shape[axis] == features`` with ``spatial`` axes before it.

    Arguments:
        module: the layer doing the check (named by its path in the message).
        shape: the input's shape.
        features: the size the layer was built for.
        name: the constructor argument that set ``features``.
        axis: the feature axis (default -1, channels-last).
        spatial: how many spatial axes must precede the feature axis (convs).

    Example:
        >>> import toylib as tl
        >>> check_features(tl.Module(), (2, 3), 3)            # fine: returns None
        >>> check_features(tl.Module(), (2, 4), 3)
        Traceback (most recent call last):
        ValueError: model (Module): expected input of shape (..., 3), got (2, 4).
        ...
    """
    ndim = len(shape)
    if ndim >= spatial + 1 and -ndim <= axis < ndim and shape[axis] == features:
        return
    if spatial:
        expected = f"(*batch, {', '.join(f's{i}' for i in range(spatial))}, {features})"
    elif axis == -1:
        expected = f"(..., {features})"
    else:
        expected = f"{features} features on axis {axis}"
    got = shape[axis] if -ndim <= axis < ndim else None
    if ndim < spatial + 1:
        fix = f"give at least {spatial + 1} axes ({spatial} spatial, then the {features} channels)."
    elif spatial:
        first = ndim - spatial - 1  # where a channels-first (NCHW) input keeps its channels
        looks = (
            f" (axis {first} has {features}: it looks channels-first)"
            if (first >= 0 and shape[first] == features)
            else ""
        )
        fix = (
            f"convolutions take channels-last inputs (*batch, *spatial, channels){looks}. "
            f"Move the channels of an NCHW array last with `jnp.moveaxis(x, {first}, -1)`, "
            f"or build the layer with {name}={got}."
        )
    else:
        fix = (
            f"feed {features} features on axis {axis} ({name}={features}), "
            f"or build the layer with {name}={got}."
        )
    raise ValueError(
        WRONG_SHAPE.format(where=module_path(module), expected=expected, shape=shape, fix=fix)
    )
