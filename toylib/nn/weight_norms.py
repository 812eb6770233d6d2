"""Wrappers that reparametrise a layer's weights on every call: WeightNorm and SpectralNorm.

Both wrap any layer (``nn.WeightNorm(nn.Linear(8, 4, rngs=0))``) and, on each
call, compute normalised weights from the layer's own Params, run the layer
with them, and put the raw weights back. So the raw weight stays the trained
parameter, gradients flow through the normalisation to it, and the wrapped
layer is unchanged between calls (PyTorch's ``parametrizations`` work the same
way). ``flax.nnx`` instead writes the normalised weight into the layer on each
call, so there the raw weight is lost after the first call; the first call's
outputs (and SpectralNorm's ``u``/``sigma``) agree with Flax's.

The swap sets ``variable.value`` and restores it in a ``finally``: if the
layer raises, it is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from toylib._core.calls import module_path
from toylib._core.filters import PathContains, to_predicate
from toylib._core.graph import iter_variables
from toylib._core.module import Module
from toylib._core.paths import Path, format_path
from toylib._core.rngs import Rngs, as_rngs
from toylib._core.variables import BatchStat, Param, Variable
from toylib.nn._sharding import Names, named_variable
from toylib.nn.normalization import _init_keys

__all__ = ["SpectralNorm", "WeightNorm"]

CHANGED_LAYER = """\
{where}: the wrapped layer's {path} ({shape}) has no {what} in this {cls}: the
layer's weights changed after the wrapper was built.
Fix: wrap the layer once its weights are final, or build a new wrapper:

    layer = nn.{cls}(layer.layer, ...)
"""

NOT_A_MATRIX = """\
SpectralNorm(error_on_non_matrix=True): {path} has shape {shape}, which is not a matrix.
Fix: leave error_on_non_matrix=False to flatten it to ({rows}, {cols}) (all axes but the
last as rows, as for a conv kernel), or select only matrices with variable_filter=...
"""


# The default filter of WeightNorm: the layers' weight matrices, not their biases.
KERNELS = PathContains("kernel")


def _key(path: Path) -> str:
    """A dict key for a Param's path inside the wrapped layer: ``kernel``, ``layers.0.kernel``."""
    return ".".join(str(k) for k in path)


def _l2_normalize(x: Array, axis: Any = None, epsilon: float = 1e-12) -> Array:
    # epsilon inside the square root, as Flax: a zero vector stays finite.
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + epsilon)


@contextlib.contextmanager
def _swapped(values: list[tuple[Variable, Any]]) -> Iterator[None]:
    """Give each Variable its new value for the duration, then put the old ones back."""
    old = [(v, v.value) for v, _ in values]
    try:
        for variable, value in values:
            variable.value = value
        yield
    finally:
        for variable, value in old:
            variable.value = value


def _out_dtype(dtype: Any, *arrays: Any) -> Any:
    return dtype if dtype is not None else jnp.result_type(*arrays)


class WeightNorm(Module):
    """Weight normalisation (Salimans & Kingma, 2016): ``w = scale * v / ||v||`` per feature.

    Each selected Param ``v`` of the wrapped layer is divided by its L2 norm
    over every axis but ``feature_axes`` and multiplied by a learned
    ``scale`` of the feature axes' shape, on every call. Decoupling the
    direction ``v / ||v||`` from the length ``scale`` speeds up training of
    plain networks; the raw ``v`` stays in the layer (see the module docstring).

    Arguments:
        layer: the layer to wrap (any Module).
        feature_axes: the axes that keep their own norm (default -1: the output
            features of a kernel); None normalises each Param as a whole.
        use_scale: learn ``scale`` (default True); without it the weights
            have unit norm.
        scale_init: initialiser of each scale (default ones).
        epsilon: added under the square root of the norm (default 1e-12).
        dtype: the dtype of the normalised weights (default: promote weight and scale).
        param_dtype: dtype the scales are stored in (default float32).
        variable_filter: which of the layer's Params to normalise (default
            ``tl.PathContains("kernel")``).
        scale_sharding: logical axis names for every ``scale`` (one per
            feature axis). Default None: each scale takes the names its
            weight has on the feature axes (a kernel named ``("embed",
            "mlp")`` gives its scale ``("mlp",)``), and none if the weight
            has none, so the scales are placed like the weights they scale.
        rngs: ``tl.Rngs``, an int seed or a key, only needed by a random
            ``scale_init``.

    Returns:
        A Module with ``layer`` and ``scales`` (a dict of ``Param``s keyed by
        the weight's path in the layer, ``"kernel"``), called like the layer.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> wn = nn.WeightNorm(nn.Linear(3, 2, rngs=0))
        >>> wn(jnp.ones((5, 3))).shape, wn.scales["kernel"].shape
        ((5, 2), (2,))
        >>> named = nn.WeightNorm(nn.Linear(3, 2, kernel_sharding=("embed", "mlp"), rngs=0))
        >>> named.scales["kernel"].sharding                # the kernel's feature axis
        ('mlp',)
    """

    def __init__(
        self,
        layer: Module,
        *,
        feature_axes: int | tuple[int, ...] | None = -1,
        use_scale: bool = True,
        scale_init: Any = jax.nn.initializers.ones,
        epsilon: float = 1e-12,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        variable_filter: Any = KERNELS,
        scale_sharding: Names = None,
        rngs: Rngs | int | jax.Array | None = None,
    ) -> None:
        self.layer = layer
        if feature_axes is not None and not isinstance(feature_axes, tuple | list):
            feature_axes = (feature_axes,)
        self.feature_axes = None if feature_axes is None else tuple(feature_axes)
        self.use_scale = use_scale
        self.epsilon = epsilon
        self.dtype = dtype
        self.variable_filter = variable_filter
        key = _init_keys(rngs, "WeightNorm(rngs=...)")
        self.scales = None
        if use_scale:
            self.scales = {
                _key(path): named_variable(
                    self,
                    f"scales[{_key(path)!r}]",
                    scale_init(key(), self._scale_shape(v.value), param_dtype),
                    self._scale_names(v) if scale_sharding is None else scale_sharding,
                    argument="scale_sharding",
                )
                for path, v in self._targets()
            }

    def _targets(self) -> list[tuple[Path, Variable]]:
        keep = to_predicate(self.variable_filter)
        return [(p, v) for p, v in iter_variables(self.layer, Param) if keep(p, v)]

    def _features(self, ndim: int) -> tuple[int, ...]:
        return (
            () if self.feature_axes is None else tuple(sorted(a % ndim for a in self.feature_axes))
        )

    def _scale_shape(self, w: Array) -> tuple[int, ...]:
        return tuple(w.shape[a] for a in self._features(w.ndim))

    def _scale_names(self, weight: Variable) -> tuple | None:
        """The weight's names on the feature axes (the scale's axes), or None."""
        names = weight.get_metadata("sharding", None)
        if names is None or len(names) != jnp.ndim(weight.value):
            return None
        return tuple(names[a] for a in self._features(len(names)))

    def _normalised(self, path: Path, w: Array) -> Array:
        features = self._features(w.ndim)
        reduce = tuple(i for i in range(w.ndim) if i not in features)
        out = _l2_normalize(w, axis=reduce, epsilon=self.epsilon)
        if not self.use_scale:
            return out.astype(_out_dtype(self.dtype, w))
        scale = self.scales.get(_key(path)) if self.scales is not None else None
        if scale is None:
            raise RuntimeError(
                CHANGED_LAYER.format(
                    where=module_path(self),
                    path=format_path(path, "layer"),
                    shape=w.shape,
                    what="scale",
                    cls="WeightNorm",
                )
            )
        shape = tuple(n if i in features else 1 for i, n in enumerate(w.shape))
        s = scale.value.reshape(shape)
        return (out * s).astype(_out_dtype(self.dtype, w, s))

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        new = [(v, self._normalised(p, v.value)) for p, v in self._targets()]
        with _swapped(new):
            return self.layer(x, *args, **kwargs)


class SpectralNorm(Module):
    """Spectral normalisation (Miyato et al., 2018): each weight over its largest singular value.

    On every call each selected Param ``W`` of the wrapped layer (matrices;
    higher-rank kernels flattened to ``(-1, W.shape[-1])``; vectors and
    scalars left alone) is divided by ``sigma``, its spectral norm estimated
    by ``n_steps`` of power iteration from the stored vector ``u``. This
    bounds the layer's Lipschitz constant, which steadies GAN discriminators.

    ``u`` and ``sigma`` are ``BatchStat``s, so the wrapper is train/eval aware
    like ``BatchNorm``: in training mode (``use_running_average=False``, the
    default) the iterated ``u`` and the new ``sigma`` are stored, so the
    estimate sharpens from call to call; in evaluation mode (``model.eval()``
    or ``use_running_average=True`` per call) the same iteration runs from
    the stored ``u`` without storing anything, so outputs are deterministic.
    This is Flax's ``update_stats`` with the opposite sign. ``u`` is not
    differentiated through (a stop-gradient, as in the paper); ``sigma`` is.

    Arguments:
        layer: the layer to wrap (any Module).
        n_steps: power-iteration steps per call (default 1); 0 turns it off.
        epsilon: added under the square roots of the L2 normalisations (default 1e-12).
        dtype: the dtype of the normalised weights (default: the weight's).
        param_dtype: dtype ``u`` and ``sigma`` are stored in (default float32).
        error_on_non_matrix: raise for weights of more than 2 axes instead of
            flattening them (default False).
        use_running_average: start in evaluation mode (default False).
        variable_filter: which of the layer's Params to normalise (default
            ``tl.Param``: all, as Flax).
        rngs: ``tl.Rngs``, an int seed or a key: ``u`` starts random
            (``params`` stream).

    Sharding: ``u`` and ``sigma`` are statistics of the wrapped weights, so
    they take their names from them rather than from arguments: for a
    weight named ``(..., "mlp")``, ``u`` ``(1, cols)`` is ``(None, "mlp")``
    and the scalar ``sigma`` is ``()`` (named, with no dimensions, so a
    stacked copy names its stacked axis). A weight without names gives
    them none.

    Returns:
        A Module with ``layer`` and ``u`` / ``sigma`` (dicts of ``BatchStat``s
        keyed by the weight's path in the layer, ``"kernel"``), called like
        the layer: ``sn(x, *args, use_running_average=None, **kwargs)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> sn = nn.SpectralNorm(nn.Linear(4, 3, rngs=0), n_steps=20, rngs=1)
        >>> y = sn(jnp.ones((2, 4)))
        >>> sigma = float(jnp.linalg.norm(sn.layer.kernel.value, ord=2))
        >>> round(float(sn.sigma["kernel"].value) / sigma, 3), sn.u["kernel"].shape
        (1.0, (1, 3))
        >>> linear = nn.Linear(4, 3, kernel_sharding=("embed", "mlp"), rngs=0)
        >>> named = nn.SpectralNorm(linear, rngs=1)
        >>> named.u["kernel"].sharding, named.sigma["kernel"].sharding
        ((None, 'mlp'), ())
    """

    def __init__(
        self,
        layer: Module,
        *,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        error_on_non_matrix: bool = False,
        use_running_average: bool = False,
        variable_filter: Any = Param,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        self.layer = layer
        self.n_steps = n_steps
        self.epsilon = epsilon
        self.dtype = dtype
        self.error_on_non_matrix = error_on_non_matrix
        self.use_running_average = use_running_average
        self.variable_filter = variable_filter
        rngs = as_rngs(rngs, "SpectralNorm(rngs=...)")
        self.u, self.sigma = {}, {}
        for path, v in self._targets():
            cols = self._matrix(path, v.value).shape[-1]
            key = rngs.params()
            names = v.get_metadata("sharding", None)
            if names is not None and len(names) != jnp.ndim(v.value):
                names = None  # names that do not describe this weight: nothing to follow
            u = jax.nn.initializers.normal()(key, (1, cols), param_dtype)
            self.u[_key(path)] = (
                BatchStat(u) if names is None else BatchStat(u, sharding=(None, names[-1]))
            )
            sigma = jnp.ones((), param_dtype)
            self.sigma[_key(path)] = (
                BatchStat(sigma) if names is None else BatchStat(sigma, sharding=())
            )

    def _targets(self) -> list[tuple[Path, Variable]]:
        if self.n_steps < 1:
            return []
        keep = to_predicate(self.variable_filter)
        return [
            (p, v)
            for p, v in iter_variables(self.layer, Param)
            if jnp.ndim(v.value) > 1 and keep(p, v)
        ]

    def _matrix(self, path: Path, w: Array) -> Array:
        if w.ndim > 2 and self.error_on_non_matrix:
            rows = int(jnp.size(w)) // w.shape[-1]
            raise ValueError(
                NOT_A_MATRIX.format(
                    path=format_path(path, "layer"), shape=w.shape, rows=rows, cols=w.shape[-1]
                )
            )
        return w.reshape(-1, w.shape[-1])

    def _normalised(self, path: Path, w: Array, update: bool) -> Array:
        key = _key(path)
        if key not in self.u:
            raise RuntimeError(
                CHANGED_LAYER.format(
                    where=module_path(self),
                    path=format_path(path, "layer"),
                    shape=w.shape,
                    what="u vector",
                    cls="SpectralNorm",
                )
            )
        matrix = self._matrix(path, w)
        u = self.u[key].value
        for _ in range(self.n_steps):
            v = _l2_normalize(u @ matrix.T, epsilon=self.epsilon)
            u = _l2_normalize(v @ matrix, epsilon=self.epsilon)
        u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
        sigma = (v @ matrix @ u.T)[0, 0]
        if update:
            self.u[key].value = u.astype(self.u[key].value.dtype)
            self.sigma[key].value = sigma.astype(self.sigma[key].value.dtype)
        out = (matrix / jnp.where(sigma != 0, sigma, 1)).reshape(w.shape)
        return out.astype(_out_dtype(self.dtype, w))

    def __call__(
        self, x: Any, *args: Any, use_running_average: bool | None = None, **kwargs: Any
    ) -> Any:
        if use_running_average is None:
            use_running_average = self.use_running_average
        update = not use_running_average
        new = [(v, self._normalised(p, v.value, update)) for p, v in self._targets()]
        with _swapped(new):
            return self.layer(x, *args, **kwargs)
