"""The model's projections: x's trailing dims contracted with a weight's leading dims.

`project(x_BLD, w_DNH)` is einsum("BLD,DNH->BLNH"), `project(o_BLNH, w_NHD, contract=2)` is
einsum("BLNH,NHD->BLD"), `project(h_BLD, embed_VD, transpose_w=True)` is h @ embed.T. With
native=True (pi_jax.dispatch decides: the CPU, float32, one device) the product is the native
sgemm kernel (pi_jax.native), which runs these shapes faster than XLA:CPU's own dot
(docs/performance.md); its gradient, and every other case, is XLA's dot_general.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pi_jax import native as native_lib


def _xla_2d(x_MK, w, transpose_w):
  return jnp.dot(x_MK, w.T if transpose_w else w, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _native_2d(x_MK, w, transpose_w):
  return native_lib.matmul(x_MK, w, transpose_w=transpose_w)


def _native_fwd(x_MK, w, transpose_w):
  return native_lib.matmul(x_MK, w, transpose_w=transpose_w), (x_MK, w)


def _native_bwd(transpose_w, res, g_MN):
  x_MK, w = res
  _, vjp = jax.vjp(lambda x, w: _xla_2d(x, w, transpose_w), x_MK, w)  # the primal is dead code
  return vjp(g_MN)


_native_2d.defvjp(_native_fwd, _native_bwd)


def _contraction(x, w, contract: int, transpose_w: bool):
  """(x's contracted dims, w's, the output's trailing shape); a shape mismatch is an error."""
  if transpose_w:
    if contract != 1 or w.ndim != 2:
      raise ValueError(f"transpose_w needs a 2-D weight and contract=1, got {w.shape}, {contract}")
    w_dims, out_tail = (1,), (w.shape[0],)
  else:
    w_dims, out_tail = tuple(range(contract)), w.shape[contract:]
  x_dims = tuple(range(x.ndim - contract, x.ndim))
  if [x.shape[d] for d in x_dims] != [w.shape[d] for d in w_dims]:
    raise ValueError(f"project: x {x.shape} and w {w.shape} do not contract over {contract} dims"
                     f"{' (w transposed)' if transpose_w else ''}")
  return x_dims, w_dims, tuple(out_tail)


def project_xla(x, w, *, contract: int = 1, transpose_w: bool = False,
                preferred_element_type=None):
  """`project` by XLA's dot_general, whatever the backend (what `project` falls back to)."""
  x_dims, w_dims, _ = _contraction(x, w, contract, transpose_w)
  return jax.lax.dot_general(x, w, ((x_dims, w_dims), ((), ())),
                             preferred_element_type=preferred_element_type)


def project(x, w, *, contract: int = 1, transpose_w: bool = False, preferred_element_type=None,
            native: bool = False):
  """x's last `contract` dims against w's first `contract` dims (w [N, K] against x's last dim
  when transpose_w). The result has x's dtype, or preferred_element_type. native: by the native
  kernel (float32 operands only)."""
  _, _, out_tail = _contraction(x, w, contract, transpose_w)
  if not native or x.dtype != jnp.float32 or w.dtype != jnp.float32:
    return project_xla(x, w, contract=contract, transpose_w=transpose_w,
                       preferred_element_type=preferred_element_type)
  k = math.prod(x.shape[x.ndim - contract:])
  w_2d = w if transpose_w else w.reshape(k, -1)
  out = _native_2d(x.reshape(-1, k), w_2d, transpose_w)
  return out.reshape(x.shape[:x.ndim - contract] + out_tail).astype(
      preferred_element_type or x.dtype)
