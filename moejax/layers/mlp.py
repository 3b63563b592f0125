"""Dense SwiGLU MLP: down(silu(x @ gate) * (x @ up))."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers import param
from moejax.mesh import constrain


class MLP(nnx.Module):
    """SwiGLU with gate/up [D, F] ('embed','mlp') and down [F, D] ('mlp','embed'); no biases."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        D, F = cfg.d_model, cfg.d_ff
        init = jax.nn.initializers.truncated_normal(cfg.init_std)
        out_init = jax.nn.initializers.truncated_normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        self.gate = param(init, rngs.params(), (D, F), cfg.param_dtype, ("embed", "mlp"))
        self.up = param(init, rngs.params(), (D, F), cfg.param_dtype, ("embed", "mlp"))
        self.down = param(out_init, rngs.params(), (F, D), cfg.param_dtype, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B,T,D] -> [B,T,D]."""
        dt = self.dtype
        g = jnp.einsum("btd,df->btf", x, self.gate[...].astype(dt))
        u = jnp.einsum("btd,df->btf", x, self.up[...].astype(dt))
        h = constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"))  # [B,T,F]
        y = jnp.einsum("btf,fd->btd", h, self.down[...].astype(dt))
        return constrain(y, ("batch", "length", "embed"))
