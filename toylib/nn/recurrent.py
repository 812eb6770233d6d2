"""Recurrent layers: LSTMCell, GRUCell, SimpleCell (one step), RNN (a cell scanned over time).

A cell is called as ``cell(carry, x) -> (new_carry, y)`` on ``x`` of shape
``(*batch, in_features)``, Flax's convention. ``nn.RNN(cell)`` runs it over
the time axis of ``(*batch, time, features)`` inputs with ``tl.scan``.

Parameters are fused over the gates: one ``kernel`` ``(in, G * hidden)``, one
``recurrent_kernel`` ``(hidden, G * hidden)`` and one ``bias``, gate ``k``
owning columns ``[k * hidden, (k + 1) * hidden)`` in PyTorch's gate order
(LSTM: i, f, g, o; GRU: r, z, n). One matmul per step and per input instead
of one per gate, and the weights copy column-block by column-block into
``flax.nnx.LSTMCell`` / ``nnx.GRUCell`` (as shown in each docstring) or, once
transposed, into ``torch.nn.LSTM`` / ``torch.nn.GRU``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from toylib._core.calls import labelled, module_path
from toylib._core.module import Module
from toylib._core.rngs import Rngs, as_rngs
from toylib.nn._sharding import Names, named_variable
from toylib.nn.checks import check_features
from toylib.nn.dtypes import promote_dtype
from toylib.nn.linear import default_kernel_init
from toylib.transforms.batching import Carry, scan

__all__ = ["GRUCell", "LSTMCell", "RNN", "SimpleCell"]

default_recurrent_kernel_init = jax.nn.initializers.orthogonal()

BAD_LSTM_CARRY = """\
{where}: the carry of an LSTMCell is a pair (c, h) of (*batch, {hidden}) arrays; got {got}.
Fix: start from the cell's zeros and pass back the carry it returns:

    carry = cell.initialize_carry(x.shape)     # x: (*batch, {features})
    carry, y = cell(carry, x)
"""

BAD_CARRY_SHAPE = """\
{where}: expected a carry of shape (..., {hidden}) (hidden_features={hidden}), got {shape}.
Fix: start from `cell.initialize_carry(x.shape)`, or pass an initial carry whose last
axis is hidden_features={hidden}.
"""

BAD_INPUT_SHAPE = """\
{where}: initialize_carry takes the shape of the cell's input, (*batch, in_features={features}),
like Flax; got {shape}.
Fix: pass the input's shape, `cell.initialize_carry(x.shape)`, or `(*batch, {features})`.
"""

NO_TIME_AXIS = """\
{where}: expected input of shape (*batch, time, {features}), got {shape}: no time axis.
Fix: a single step is `cell(carry, x)`; for a sequence of one step use x[..., None, :].
"""

BAD_SEQ_LENGTHS = """\
{where}: seq_lengths must have the batch shape of the input, {batch}; got {shape}.
Fix: one length per sequence, e.g. `jnp.array([T0, T1, ...])` for input (batch, time, features).
"""


def _init_gates(
    init: Callable, rngs: Rngs, shape: tuple[int, ...], gates: int, param_dtype: Any
) -> jax.Array:
    """``gates`` blocks drawn separately from ``init`` and joined on the last axis.

    Drawing per gate gives each gate the distribution it would have as its
    own layer (as in nnx.LSTMCell's per-gate Linears): an orthogonal
    recurrent kernel is orthogonal for every gate, not only as a whole.
    Half-precision blocks are drawn in float32 and cast, because the
    orthogonal initialiser's QR has no bfloat16 kernel.
    """
    draw_dtype = param_dtype
    if jnp.issubdtype(param_dtype, jnp.floating) and jnp.dtype(param_dtype).itemsize < 4:
        draw_dtype = jnp.float32
    blocks = [init(rngs.params(), shape, draw_dtype) for _ in range(gates)]
    return jnp.concatenate(blocks, axis=-1).astype(param_dtype)


def _carry_dtype(dtype: Any, param_dtype: Any) -> Any:
    # The compute dtype when fixed (so a bf16 cell carries bf16), else storage.
    return param_dtype if dtype is None else dtype


def _single_carry(cell: Any, carry: Any) -> jax.Array:
    """The carry of a one-array cell (GRUCell, SimpleCell), checked: one array, the right shape."""
    if isinstance(carry, tuple | list):
        kind = type(cell).__name__
        raise TypeError(
            BAD_CARRY_SHAPE.format(
                where=module_path(cell),
                hidden=cell.hidden_features,
                shape=f"a {type(carry).__name__} (a {kind}'s carry is one array, h)",
            )
        )
    h = jnp.asarray(carry)
    _check_carry_shape(cell, h)
    return h


def _check_carry_shape(cell: Any, h: jax.Array) -> None:
    if h.ndim == 0 or h.shape[-1] != cell.hidden_features:
        raise ValueError(
            BAD_CARRY_SHAPE.format(
                where=module_path(cell), hidden=cell.hidden_features, shape=tuple(h.shape)
            )
        )


def _zeros_carry(cell: Any, input_shape: tuple[int, ...]) -> jax.Array:
    input_shape = tuple(input_shape)
    if not input_shape or input_shape[-1] != cell.in_features:
        raise ValueError(
            BAD_INPUT_SHAPE.format(
                where=module_path(cell), features=cell.in_features, shape=input_shape
            )
        )
    shape = (*input_shape[:-1], cell.hidden_features)
    return jnp.zeros(shape, _carry_dtype(cell.dtype, cell.param_dtype))


@runtime_checkable
class Cell(Protocol):
    """What ``nn.RNN`` needs of a cell (a Module): a step and its initial carry."""

    def __call__(self, carry: Any, x: Any) -> tuple[Any, Any]: ...

    def initialize_carry(self, input_shape: tuple[int, ...]) -> Any: ...


class _Cell(Module):
    """What the cells share: matmuls at the cell's ``precision``."""

    precision: Any = None

    def _mm(self, a: Array, b: Array) -> Array:
        return jnp.matmul(a, b, precision=self.precision)


class LSTMCell(_Cell):
    """One step of a long short-term memory cell: ``(c, h), x -> (c', h'), h'``.

    With ``gate = gate_fn`` (sigmoid) and ``act = activation_fn`` (tanh)::

        i  = gate(x W_i + h U_i + b_i)       input gate
        f  = gate(x W_f + h U_f + b_f)       forget gate
        g  = act(x W_g + h U_g + b_g)        candidate
        o  = gate(x W_o + h U_o + b_o)       output gate
        c' = f * c + i * g
        h' = o * act(c')

    ``kernel = [W_i W_f W_g W_o]`` ``(in, 4H)``, ``recurrent_kernel = [U_i U_f
    U_g U_o]`` ``(H, 4H)``, ``bias = [b_i b_f b_g b_o]`` ``(4H,)``: gate
    order i, f, g, o (PyTorch's), gate ``k`` in columns ``[kH, (k+1)H)``.
    One bias per gate: PyTorch's ``b_ih + b_hh``. To copy into
    ``nnx.LSTMCell``: ``ii/if_/ig/io.kernel = kernel`` blocks,
    ``hi/hf/hg/ho.kernel = recurrent_kernel`` blocks, ``hi/hf/hg/ho.bias =
    bias`` blocks; ``nnx.OptimizedLSTMCell`` takes them whole
    (``dense_i.kernel``, ``dense_h.kernel``, ``dense_h.bias``).

    The new carry keeps the dtype of the carry passed in (so ``lax.scan``
    sees a fixed carry type); the output ``h'`` is in the compute dtype.

    Arguments:
        in_features: size of the input's last axis.
        hidden_features: size of ``c`` and ``h`` (``H``).
        gate_fn: the gates' activation (default sigmoid).
        activation_fn: the candidate's and output's activation (default tanh).
        kernel_init: initialiser of each gate's ``(in, H)`` input kernel
            (default LeCun normal).
        recurrent_kernel_init: initialiser of each gate's ``(H, H)`` recurrent
            kernel (default orthogonal).
        bias_init: initialiser of each gate's bias (default zeros).
        dtype: compute dtype (default: promote input, carry and parameters).
        precision: ``jax.lax`` precision of the matmuls (default None).
        param_dtype: dtype the parameters are stored in (default float32).
        kernel_sharding, recurrent_kernel_sharding, bias_sharding: logical
            axis names of ``kernel`` ``(in, 4H)``, ``recurrent_kernel`` ``(H,
            4H)`` and ``bias`` ``(4H,)``, one per dimension (a str, or None:
            not sharded), e.g. ``("embed", "mlp")``, ``(None, "mlp")``,
            ``("mlp",)``; stored as their ``sharding`` metadata for
            ``tl.sharding``. Default None: no names (replicated).
        rngs: ``tl.Rngs``, an int seed or a key; the ``params`` stream is used.

    Returns:
        A Module called as ``cell((c, h), x)`` on ``x`` ``(*batch, in_features)``
        and ``c, h`` ``(*batch, hidden_features)``, giving ``((c', h'), h')``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> cell = nn.LSTMCell(3, 4, rngs=0)
        >>> x = jnp.ones((2, 3))
        >>> (c, h), y = cell(cell.initialize_carry(x.shape), x)
        >>> c.shape, h.shape, cell.kernel.shape, cell.recurrent_kernel.shape
        ((2, 4), (2, 4), (3, 16), (4, 16))
        >>> nn.LSTMCell(3, 4, kernel_sharding=("embed", "mlp"), rngs=0).kernel.sharding
        ('embed', 'mlp')
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        gate_fn: Callable[[Array], Array] = jax.nn.sigmoid,
        activation_fn: Callable[[Array], Array] = jnp.tanh,
        kernel_init: Any = default_kernel_init,
        recurrent_kernel_init: Any = default_recurrent_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_sharding: Names = None,
        recurrent_kernel_sharding: Names = None,
        bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        rngs = as_rngs(rngs, "LSTMCell(rngs=...)")
        n, h = in_features, hidden_features
        kernel = _init_gates(kernel_init, rngs, (n, h), 4, param_dtype)
        self.kernel = named_variable(self, "kernel", kernel, kernel_sharding)
        recurrent = _init_gates(recurrent_kernel_init, rngs, (h, h), 4, param_dtype)
        self.recurrent_kernel = named_variable(
            self, "recurrent_kernel", recurrent, recurrent_kernel_sharding
        )
        bias = _init_gates(bias_init, rngs, (h,), 4, param_dtype)
        self.bias = named_variable(self, "bias", bias, bias_sharding)
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.gate_fn = gate_fn
        self.activation_fn = activation_fn
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision

    def __call__(
        self,
        carry: tuple[Float[ArrayLike, "*batch hidden"], Float[ArrayLike, "*batch hidden"]],
        x: Float[ArrayLike, "*batch in"],
    ) -> tuple[tuple[Float[Array, "*batch hidden"], Float[Array, "*batch hidden"]], Array]:
        x = jnp.asarray(x)
        check_features(self, x.shape, self.in_features)
        if not (isinstance(carry, tuple | list) and len(carry) == 2):
            got = f"a {type(carry).__name__}"
            if hasattr(carry, "shape"):
                got += f" of shape {tuple(carry.shape)}"
            raise TypeError(
                BAD_LSTM_CARRY.format(
                    where=module_path(self),
                    hidden=self.hidden_features,
                    features=self.in_features,
                    got=got,
                )
            )
        c_in, h_in = jnp.asarray(carry[0]), jnp.asarray(carry[1])
        _check_carry_shape(self, c_in)
        _check_carry_shape(self, h_in)
        x, c, h, kernel, recurrent, bias = promote_dtype(
            x,
            c_in,
            h_in,
            self.kernel.value,
            self.recurrent_kernel.value,
            self.bias.value,
            dtype=self.dtype,
        )
        z = self._mm(x, kernel) + self._mm(h, recurrent) + bias
        i, f, g, o = jnp.split(z, 4, axis=-1)
        new_c = self.gate_fn(f) * c + self.gate_fn(i) * self.activation_fn(g)
        new_h = self.gate_fn(o) * self.activation_fn(new_c)
        return (new_c.astype(c_in.dtype), new_h.astype(h_in.dtype)), new_h

    def initialize_carry(
        self, input_shape: tuple[int, ...], rngs: Rngs | None = None
    ) -> tuple[Array, Array]:
        """Zeros ``(c, h)`` for an input of shape ``input_shape`` = ``(*batch, in_features)``.

        Takes the input's shape, like Flax (not the batch shape). The dtype
        is ``dtype`` if set, else ``param_dtype``. ``rngs`` is accepted for
        Flax compatibility and unused (the carry is zeros).
        """
        return _zeros_carry(self, input_shape), _zeros_carry(self, input_shape)


class GRUCell(_Cell):
    """One step of a gated recurrent unit: ``h, x -> h', h'``.

    With ``gate = gate_fn`` (sigmoid) and ``act = activation_fn`` (tanh)::

        r  = gate(x W_r + b_r + h U_r)               reset gate
        z  = gate(x W_z + b_z + h U_z)               update gate
        n  = act(x W_n + b_n + r * (h U_n + b_hn))   candidate
        h' = (1 - z) * n + z * h

    This is the variant of PyTorch, cuDNN and Flax (Keras' ``reset_after``):
    the reset gate multiplies ``h U_n + b_hn``, after the matmul, rather than
    ``h`` before it (the 2014 paper's form).

    ``kernel = [W_r W_z W_n]`` ``(in, 3H)``, ``recurrent_kernel = [U_r U_z
    U_n]`` ``(H, 3H)``, ``bias = [b_r b_z b_n]`` ``(3H,)`` (gate order r, z,
    n, PyTorch's), and ``recurrent_bias = b_hn`` ``(H,)``. To copy into
    ``nnx.GRUCell``: ``dense_i.kernel = kernel``, ``dense_i.bias = bias``,
    ``dense_h.kernel = recurrent_kernel``; Flax's cell has no ``b_hn``, so
    that copy is exact while ``recurrent_bias`` is zero (its initial value).
    From PyTorch: ``bias = b_ih + [b_hr, b_hz, 0]``, ``recurrent_bias = b_hn``.

    The new carry keeps the dtype of the carry passed in (so ``lax.scan``
    sees a fixed carry type); the output ``h'`` is in the compute dtype.

    Arguments:
        in_features: size of the input's last axis.
        hidden_features: size of ``h`` (``H``).
        gate_fn: the gates' activation (default sigmoid).
        activation_fn: the candidate's activation (default tanh).
        kernel_init: initialiser of each gate's ``(in, H)`` input kernel
            (default LeCun normal).
        recurrent_kernel_init: initialiser of each gate's ``(H, H)`` recurrent
            kernel (default orthogonal).
        bias_init: initialiser of ``bias`` (per gate) and ``recurrent_bias``
            (default zeros).
        dtype: compute dtype (default: promote input, carry and parameters).
        precision: ``jax.lax`` precision of the matmuls (default None).
        param_dtype: dtype the parameters are stored in (default float32).
        kernel_sharding, recurrent_kernel_sharding, bias_sharding: logical
            axis names of ``kernel`` ``(in, 3H)``, ``recurrent_kernel`` ``(H,
            3H)`` and ``bias`` ``(3H,)``, one per dimension (a str, or None:
            not sharded); stored as their ``sharding`` metadata for
            ``tl.sharding``. Default None: no names (replicated).
        recurrent_bias_sharding: the ``(H,)`` ``recurrent_bias``'s names
            (default None).
        rngs: ``tl.Rngs``, an int seed or a key; the ``params`` stream is used.

    Returns:
        A Module called as ``cell(h, x)`` on ``x`` ``(*batch, in_features)``
        and ``h`` ``(*batch, hidden_features)``, giving ``(h', h')``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> cell = nn.GRUCell(3, 4, rngs=0)
        >>> x = jnp.ones((2, 3))
        >>> h, y = cell(cell.initialize_carry(x.shape), x)
        >>> h.shape, cell.kernel.shape, cell.recurrent_bias.shape
        ((2, 4), (3, 12), (4,))
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        gate_fn: Callable[[Array], Array] = jax.nn.sigmoid,
        activation_fn: Callable[[Array], Array] = jnp.tanh,
        kernel_init: Any = default_kernel_init,
        recurrent_kernel_init: Any = default_recurrent_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_sharding: Names = None,
        recurrent_kernel_sharding: Names = None,
        bias_sharding: Names = None,
        recurrent_bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        rngs = as_rngs(rngs, "GRUCell(rngs=...)")
        n, h = in_features, hidden_features
        kernel = _init_gates(kernel_init, rngs, (n, h), 3, param_dtype)
        self.kernel = named_variable(self, "kernel", kernel, kernel_sharding)
        recurrent = _init_gates(recurrent_kernel_init, rngs, (h, h), 3, param_dtype)
        self.recurrent_kernel = named_variable(
            self, "recurrent_kernel", recurrent, recurrent_kernel_sharding
        )
        bias = _init_gates(bias_init, rngs, (h,), 3, param_dtype)
        self.bias = named_variable(self, "bias", bias, bias_sharding)
        recurrent_bias = _init_gates(bias_init, rngs, (h,), 1, param_dtype)
        self.recurrent_bias = named_variable(
            self, "recurrent_bias", recurrent_bias, recurrent_bias_sharding
        )
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.gate_fn = gate_fn
        self.activation_fn = activation_fn
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision

    def __call__(
        self, carry: Float[ArrayLike, "*batch hidden"], x: Float[ArrayLike, "*batch in"]
    ) -> tuple[Float[Array, "*batch hidden"], Float[Array, "*batch hidden"]]:
        x = jnp.asarray(x)
        check_features(self, x.shape, self.in_features)
        h_in = _single_carry(self, carry)
        x, h, kernel, recurrent, bias, recurrent_bias = promote_dtype(
            x,
            h_in,
            self.kernel.value,
            self.recurrent_kernel.value,
            self.bias.value,
            self.recurrent_bias.value,
            dtype=self.dtype,
        )
        xr, xz, xn = jnp.split(self._mm(x, kernel) + bias, 3, axis=-1)
        hr, hz, hn = jnp.split(self._mm(h, recurrent), 3, axis=-1)
        r = self.gate_fn(xr + hr)
        z = self.gate_fn(xz + hz)
        n = self.activation_fn(xn + r * (hn + recurrent_bias))
        new_h = (1.0 - z) * n + z * h
        return new_h.astype(h_in.dtype), new_h

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: Rngs | None = None) -> Array:
        """Zeros ``h`` for an input of shape ``input_shape`` = ``(*batch, in_features)``.

        Takes the input's shape, like Flax (not the batch shape). The dtype
        is ``dtype`` if set, else ``param_dtype``. ``rngs`` is accepted for
        Flax compatibility and unused (the carry is zeros).
        """
        return _zeros_carry(self, input_shape)


class SimpleCell(_Cell):
    """One step of an Elman (vanilla) recurrent cell: ``h, x -> h', h'``.

    ``h' = act(x W + b + h U)``, or with ``residual=True``
    ``h' = act(x W + b + h U + h)``; ``act = activation_fn`` (tanh).
    ``kernel = W`` ``(in, H)``, ``recurrent_kernel = U`` ``(H, H)``, ``bias
    = b`` ``(H,)`` (one bias: the two would only be summed). To copy into
    ``nnx.SimpleCell``: ``dense_i.kernel = kernel``, ``dense_i.bias = bias``,
    ``dense_h.kernel = recurrent_kernel``; PyTorch's ``nn.RNN`` holds the
    transposes and ``bias = b_ih + b_hh``.

    The new carry keeps the dtype of the carry passed in; the output is in
    the compute dtype.

    Arguments:
        in_features: size of the input's last axis.
        hidden_features: size of ``h`` (``H``).
        residual: add ``h`` before the activation (default False).
        activation_fn: the activation (default tanh).
        kernel_init: initialiser of ``kernel`` (default LeCun normal).
        recurrent_kernel_init: initialiser of ``recurrent_kernel`` (default orthogonal).
        bias_init: initialiser of ``bias`` (default zeros).
        dtype: compute dtype (default: promote input, carry and parameters).
        precision: ``jax.lax`` precision of the matmuls (default None).
        param_dtype: dtype the parameters are stored in (default float32).
        kernel_sharding, recurrent_kernel_sharding, bias_sharding: logical
            axis names of ``kernel`` ``(in, H)``, ``recurrent_kernel`` ``(H,
            H)`` and ``bias`` ``(H,)``, one per dimension (a str, or None:
            not sharded); stored as their ``sharding`` metadata for
            ``tl.sharding``. Default None: no names (replicated).
        rngs: ``tl.Rngs``, an int seed or a key; the ``params`` stream is used.

    Returns:
        A Module called as ``cell(h, x)`` on ``x`` ``(*batch, in_features)``
        and ``h`` ``(*batch, hidden_features)``, giving ``(h', h')``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> rnn = nn.RNN(nn.SimpleCell(3, 4, rngs=0))
        >>> rnn(jnp.ones((2, 5, 3))).shape
        (2, 5, 4)
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        residual: bool = False,
        activation_fn: Callable[[Array], Array] = jnp.tanh,
        kernel_init: Any = default_kernel_init,
        recurrent_kernel_init: Any = default_recurrent_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_sharding: Names = None,
        recurrent_kernel_sharding: Names = None,
        bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        rngs = as_rngs(rngs, "SimpleCell(rngs=...)")
        n, h = in_features, hidden_features
        kernel = _init_gates(kernel_init, rngs, (n, h), 1, param_dtype)
        self.kernel = named_variable(self, "kernel", kernel, kernel_sharding)
        recurrent = _init_gates(recurrent_kernel_init, rngs, (h, h), 1, param_dtype)
        self.recurrent_kernel = named_variable(
            self, "recurrent_kernel", recurrent, recurrent_kernel_sharding
        )
        bias = _init_gates(bias_init, rngs, (h,), 1, param_dtype)
        self.bias = named_variable(self, "bias", bias, bias_sharding)
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.residual = residual
        self.activation_fn = activation_fn
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision

    def __call__(
        self, carry: Float[ArrayLike, "*batch hidden"], x: Float[ArrayLike, "*batch in"]
    ) -> tuple[Float[Array, "*batch hidden"], Float[Array, "*batch hidden"]]:
        x = jnp.asarray(x)
        check_features(self, x.shape, self.in_features)
        h_in = _single_carry(self, carry)
        x, h, kernel, recurrent, bias = promote_dtype(
            x,
            h_in,
            self.kernel.value,
            self.recurrent_kernel.value,
            self.bias.value,
            dtype=self.dtype,
        )
        z = self._mm(x, kernel) + bias + self._mm(h, recurrent)
        new_h = self.activation_fn(z + h if self.residual else z)
        return new_h.astype(h_in.dtype), new_h

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: Rngs | None = None) -> Array:
        """Zeros ``h`` for an input of shape ``input_shape`` = ``(*batch, in_features)``.

        As ``GRUCell.initialize_carry``: the input's shape (Flax's), dtype
        ``dtype`` if set else ``param_dtype``, ``rngs`` unused.
        """
        return _zeros_carry(self, input_shape)


def _flip(x: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Reverse axis 0 (time) of ``(time, *batch, ...)``; with lengths, only each valid prefix.

    Padding stays where it is, so a reversed padded sequence starts with its
    last real step, as Flax's ``flip_sequences`` does.
    """
    if lengths is None:
        return jnp.flip(x, axis=0)
    steps = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * lengths.ndim)
    index = jnp.where(steps < lengths, lengths - 1 - steps, steps)
    index = index.reshape(index.shape + (1,) * (x.ndim - index.ndim))
    return jnp.take_along_axis(x, jnp.broadcast_to(index, x.shape), axis=0)


class RNN(Module):
    """Run a recurrent cell over the time axis: ``(*batch, time, in) -> (*batch, time, H)``.

    The time axis is the second to last (batch-major, Flax's default). The
    cell's parameters are shared across steps; its carry starts at
    ``cell.initialize_carry`` (zeros) unless ``initial_carry`` is given.

    ``reverse=True`` reads the sequence from its last step to its first; its
    outputs then come in processing order (``outputs[..., 0, :]`` is the
    step that read the last input), unless ``keep_order=True`` puts them back
    in input order (what a bidirectional layer concatenates).

    ``seq_lengths`` (``(*batch,)`` ints) handles padded batches: steps at or
    beyond a sequence's length leave its carry unchanged and output zeros,
    so the final carry is the one after its last real step; with
    ``reverse`` only the real steps are reversed (padding stays at the end).

    Arguments:
        cell: the cell (``LSTMCell``, ``GRUCell`` or any Module called as
            ``cell(carry, x) -> (carry, y)`` with an ``initialize_carry``).
        reverse: process time backwards (default False).
        keep_order: with ``reverse``, return outputs in input order.
        return_carry: return ``(final_carry, outputs)`` (default: outputs).
        unroll: steps unrolled per loop iteration (``jax.lax.scan``'s).

    Returns:
        A Module called as ``rnn(x, *, initial_carry=None, seq_lengths=None,
        return_carry=None)`` giving ``(*batch, time, out)`` outputs, or
        ``(final_carry, outputs)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> rnn = nn.RNN(nn.LSTMCell(3, 4, rngs=0), return_carry=True)
        >>> (c, h), ys = rnn(jnp.ones((2, 5, 3)))      # 2 sequences of 5 steps
        >>> ys.shape, h.shape, bool((ys[:, -1] == h).all())
        ((2, 5, 4), (2, 4), True)
    """

    def __init__(
        self,
        cell: Cell,
        *,
        reverse: bool = False,
        keep_order: bool = False,
        return_carry: bool = False,
        unroll: int | bool = 1,
    ) -> None:
        self.cell = cell
        self.reverse = reverse
        self.keep_order = keep_order
        self.return_carry = return_carry
        self.unroll = unroll

    def __call__(
        self,
        x: Float[ArrayLike, "*batch time in"],
        *,
        initial_carry: Any = None,
        seq_lengths: Int[ArrayLike, "*batch"] | None = None,
        return_carry: bool | None = None,
    ) -> Any:
        x = jnp.asarray(x)
        features = getattr(self.cell, "in_features", None)
        if x.ndim < 2:
            raise ValueError(
                NO_TIME_AXIS.format(where=module_path(self), features=features, shape=x.shape)
            )
        if features is not None:
            # Checked here, on the whole sequence, so the message shows the
            # input as given (inside the scan the cell sees one step).
            check_features(self, x.shape, features, name="cell.in_features")
        return_carry = self.return_carry if return_carry is None else return_carry
        batch = x.shape[:-2]
        lengths = None
        if seq_lengths is not None:
            lengths = jnp.asarray(seq_lengths)
            if lengths.shape != batch:
                raise ValueError(
                    BAD_SEQ_LENGTHS.format(
                        where=module_path(self), batch=batch, shape=lengths.shape
                    )
                )
        if initial_carry is None:
            initial_carry = self.cell.initialize_carry((*batch, x.shape[-1]))

        xs = jnp.moveaxis(x, -2, 0)  # scans run over the leading axis
        if self.reverse:
            # Flip explicitly rather than use scan(reverse=True): with
            # seq_lengths only each sequence's real steps are reversed.
            xs = _flip(xs, lengths)

        # tl.scan rather than jax.lax.scan: the cell is a Module argument
        # (in_axes None: its parameters are the same every step) and toylib
        # rebuilds it around the traced values and writes any state it
        # changes back out, whereas a cell closed over by a raw lax.scan body
        # would leak tracers if it updated a Variable (an Rngs counter).
        if lengths is None:

            def step(cell: Any, carry: Any, x_t: jax.Array) -> tuple[Any, Any]:
                # The cell is rebuilt inside the scan: label it so errors and
                # tl.summary name it `model.<rnn>.cell`.
                with labelled(cell, ".cell"):
                    return cell(carry, x_t)

            carry, ys = scan(step, in_axes=(None, Carry, 0), unroll=self.unroll)(
                self.cell, initial_carry, xs
            )
        else:
            steps = jnp.arange(xs.shape[0]).reshape((-1,) + (1,) * len(batch))
            valid = steps < lengths  # (time, *batch)

            def masked_step(cell: Any, carry: Any, x_t: jax.Array, v: jax.Array) -> tuple:
                with labelled(cell, ".cell"):
                    new_carry, y = cell(carry, x_t)
                keep = lambda new, old: jnp.where(v[..., None], new, old)  # noqa: E731
                new_carry = jax.tree.map(keep, new_carry, carry)
                return new_carry, jnp.where(v[..., None], y, jnp.zeros_like(y))

            carry, ys = scan(masked_step, in_axes=(None, Carry, 0, 0), unroll=self.unroll)(
                self.cell, initial_carry, xs, valid
            )
        if self.reverse and self.keep_order:
            ys = _flip(ys, lengths)
        ys = jnp.moveaxis(ys, 0, -2)
        return (carry, ys) if return_carry else ys
