"""bfloat16 compute with float32 parameters, end to end through every layer family."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import toylib as tl
from toylib import nn


class Everything(tl.Module):
    """An image branch and a token branch, every layer computing in ``dtype``."""

    def __init__(self, dtype, rngs):
        d = dict(dtype=dtype, rngs=rngs)
        self.conv = nn.Conv(1, 4, (3, 3), **d)
        self.group = nn.GroupNorm(4, num_groups=2, dtype=dtype)
        self.up = nn.ConvTranspose(4, 4, (2, 2), strides=2, **d)
        self.batch = nn.BatchNorm(4, dtype=dtype)
        self.image_out = nn.Linear(4 * 4 * 4, 8, **d)
        self.embed = nn.Embed(10, 8, **d)
        self.norm = nn.LayerNorm(8, dtype=dtype)
        self.attn = nn.MultiHeadAttention(2, 8, **d)
        self.rms = nn.RMSNorm(8, dtype=dtype)
        self.rnn = nn.RNN(nn.GRUCell(8, 8, **d))
        self.lstm = nn.LSTMCell(8, 8, **d)
        self.blocks = nn.Stack(lambda r: nn.Linear(8, 8, dtype=dtype, rngs=r), 2, rngs=rngs)
        self.head = nn.Linear(8, 1, **d)

    def __call__(self, images, tokens):
        x = jax.nn.relu(self.group(self.conv(images)))  # (b, 8, 8, 4)
        x = nn.max_pool(x, (2, 2))  # (b, 4, 4, 4)
        x = self.batch(self.up(nn.avg_pool(x, (2, 2))))  # (b, 4, 4, 4)
        image = self.image_out(x.reshape(x.shape[0], -1))
        t = self.norm(self.embed(tokens))
        t = self.rms(t + self.attn(t, mask=nn.make_causal_mask(tokens)))
        t = self.rnn(t)[:, -1]
        carry = self.lstm.initialize_carry(t.shape)
        _, t = self.lstm(carry, t)
        y = self.blocks(image + t)
        return self.head(y)[:, 0], self.embed.attend(y)


def data():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 8, 8, 1)).astype(np.float32)
    tokens = rng.integers(0, 10, size=(6, 5))
    target = rng.normal(size=(6,)).astype(np.float32)
    return images, tokens, target


def test_bf16_compute_float32_params_trains_end_to_end():
    images, tokens, target = data()
    # Built and run under tl.jit: one compile each instead of one per eager op.
    model = tl.jit(lambda: Everything(jnp.bfloat16, tl.Rngs(0)))()
    reference = tl.clone(model)  # the same weights, float32 compute
    for _, module in tl.iter_modules(reference):
        if "dtype" in vars(module):
            module.dtype = None
    forward = tl.jit(lambda model, images, tokens: model.eval()(images, tokens))
    params = tl.state(model, tl.Param).flat()
    assert len(params) > 30
    assert {str(v.value.dtype) for v in params.values()} == {"float32"}

    y, logits = forward(model, images, tokens)
    y_ref, logits_ref = forward(reference, images, tokens)
    model.train()
    assert y.dtype == jnp.bfloat16 and logits.dtype == jnp.bfloat16
    assert y_ref.dtype == jnp.float32
    # bfloat16 keeps ~3 significant digits; through ~15 layers the outputs stay close.
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref), rtol=0.1, atol=0.1)
    scale = float(jnp.abs(logits_ref).max())
    assert float(jnp.abs(logits.astype(jnp.float32) - logits_ref).max()) < 0.1 * scale

    optimizer = tl.Optimizer(model, optax.adam(3e-3))

    @tl.jit
    def step(model, optimizer, images, tokens, target):
        def loss_fn(model):
            y, _ = model(images, tokens)
            return jnp.mean((y.astype(jnp.float32) - target) ** 2)

        loss, grads = tl.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    first, grads = step(model, optimizer, images, tokens, target)
    grad_dtypes = {str(v.value.dtype) for v in grads.flat().values()}
    assert grad_dtypes == {"float32"}  # gradients arrive in the parameters' dtype
    for _ in range(40):
        loss, _ = step(model, optimizer, images, tokens, target)
    assert float(loss) < 0.5 * float(first)
    after = tl.state(model, tl.Param).flat()
    assert {str(v.value.dtype) for v in after.values()} == {"float32"}
    assert all(bool(jnp.isfinite(v.value).all()) for v in after.values())
    assert model.batch.mean.value.dtype == jnp.float32  # running statistics too
