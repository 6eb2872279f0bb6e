"""The jitted train and eval steps, and the shapes and shardings they are built from."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from pi_jax import loss as loss_lib
from pi_jax import sharding as sharding_lib
from pi_jax.config import ModelConfig
from pi_jax.run import RunOptions
from pi_jax.train import optim
from pi_jax.train import state as state_lib
from pi_jax.train.config import TrainConfig


def row_shape(config: TrainConfig) -> tuple[int, ...]:
  """One row of a batch: [L+1] tokens (packing=concat), or [3, L+1] tokens, segment ids and
  target flags (packing=documents, pi_jax.data.packing)."""
  return (config.seq_len + 1,) if config.packing == "concat" else (3, config.seq_len + 1)


def summed_loss(model: ModelConfig, run: RunOptions, chunk: int, params, rows,
                document_positions: str = "restart"):
  """(sum of next-token NLL, token count) of a batch of rows (`row_shape`): [B, L+1] rows hold
  tokens and targets; [B, 3, L+1] rows add segment ids (attention stays in each document) and
  target flags (pi_jax.data.packing.target_mask says which targets count)."""
  if rows.ndim == 2:
    tokens_BL, targets_BL = rows[:, :-1], rows[:, 1:]
    return loss_lib.summed_loss(model, params, tokens_BL, targets_BL,
                                jnp.ones(tokens_BL.shape, jnp.bool_), chunk=chunk, run=run)
  tokens_BL, targets_BL = rows[:, 0, :-1], rows[:, 0, 1:]
  seg_BL1 = rows[:, 1]
  mask_BL = (rows[:, 2, 1:] > 0) & (seg_BL1[:, 1:] == seg_BL1[:, :-1]) & (seg_BL1[:, 1:] > 0)
  positions_BL = None  # restart: the model counts from each segment's first token
  if document_positions == "continue":
    b, l = tokens_BL.shape
    positions_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  return loss_lib.summed_loss(model, params, tokens_BL, targets_BL, mask_BL, positions_BL,
                              chunk=chunk, segment_ids_BL=seg_BL1[:, :-1], run=run)


def make_train_step(config: TrainConfig, model: ModelConfig, optimizer, shardings, batch_sharding):
  accum = config.accum_steps
  schedule = optim.learning_rate_schedule(config)
  replicated = NamedSharding(batch_sharding.mesh, P())

  loss_fn = functools.partial(summed_loss, model, config.run, config.loss_chunk,
                              document_positions=config.document_positions)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, rows_GL1):
    params = state["params"]
    if accum == 1:
      (total, count), grads = grad_fn(params, rows_GL1)
      grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    else:
      g, row = rows_GL1.shape[0], rows_GL1.shape[1:]
      # Micro-batch a takes rows a, A+a, 2A+a, ...: each device keeps its own rows in every
      # micro-batch, so the split moves no data between devices.
      micro_ABL1 = rows_GL1.reshape(g // accum, accum, *row).swapaxes(0, 1)
      micro_ABL1 = sharding_lib.shard(micro_ABL1, (None, "batch") + (None,) * len(row))

      def body(carry, rows_BL1):
        total, count, grads = carry
        (t, c), g_ = grad_fn(params, rows_BL1)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g_)
        return (total + t, count + c, grads), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      (total, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), micro_ABL1)
    # One reciprocal for the loss and every gradient: with concat rows the count is a constant
    # and XLA turns a division by it into this multiplication anyway; written out, rows whose
    # count is data (packing=documents) take the same rounding (test_packing.py: loss, gradients
    # and parameters bit for bit; the summed NLL is loss.pairwise_sum's, the same in both).
    inv_count = 1.0 / count
    loss = total * inv_count
    grads = jax.tree.map(lambda g, p: (g * inv_count).astype(p.dtype), grads, params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
           "opt_state": opt_state}
    # A finite loss and gradient can still make a non-finite update (a huge learning rate):
    # such a state is never kept, so never saved as "the last checkpoint".
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    # Keep the old state on a bad step: the state is donated, so this is the only copy left.
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    out = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state["step"]),
           "ok": ok, "tokens": count}
    return new, out

  return jax.jit(step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def make_eval_step(config: TrainConfig, model: ModelConfig, shardings, batch_sharding):
  replicated = NamedSharding(batch_sharding.mesh, P())

  evaluate = functools.partial(summed_loss, model, config.run, config.loss_chunk,
                               document_positions=config.document_positions)
  return jax.jit(evaluate, in_shardings=(shardings["params"], batch_sharding),
                 out_shardings=replicated)


@dataclasses.dataclass
class StepSpecs:
  """Everything the jitted steps are built from, without a single parameter allocated."""
  optimizer: optax.GradientTransformation
  abstract: dict  # ShapeDtypeStructs of the train state
  shardings: dict  # NamedShardings of the train state
  batch_sharding: NamedSharding  # [global_batch, *row_shape] rows of the train step
  eval_sharding: NamedSharding  # [micro_batch, *row_shape] rows of the eval step

  def abstract_state(self) -> dict:
    """The state's ShapeDtypeStructs carrying their shardings (what `.lower` takes)."""
    return state_lib.with_shardings(self.abstract, self.shardings)


def batch_config_for_mesh(config: TrainConfig, mesh) -> TrainConfig:
  """`config` on `mesh`: micro_batch=-1 resolved to one sequence per batch shard, and an error
  when a micro-batch does not split over the batch shards (data × fsdp)."""
  shards = sharding_lib.batch_shards(mesh)
  config = config.for_batch_shards(shards)
  micro = config.global_batch // config.accum_steps
  if micro % shards:
    raise ValueError(
        f"global_batch {config.global_batch} in {config.accum_steps} micro-batch(es) of {micro} "
        f"cannot be split over the {shards} data shards of mesh {dict(mesh.shape)}: each "
        f"micro-batch must be a multiple of {shards} (otherwise every device would get the "
        "whole batch: no data parallelism), or use a tensor / sequence axis for some chips")
  return config


def step_specs(config: TrainConfig, model: ModelConfig, mesh,
               param_dtype: str = "float32") -> StepSpecs:
  """Optimizer, abstract state and shardings of a run on `mesh` (real or compile-only devices);
  param_dtype: the parameters' dtype (pi_jax.train.setup.param_dtype)."""
  optimizer = optim.make_optimizer(config)
  abstract = state_lib.abstract_state(model, optimizer, param_dtype)
  shardings = state_lib.state_shardings(mesh, model, optimizer, abstract)
  micro = config.global_batch // config.accum_steps
  row = row_shape(config)
  rows = lambda b: sharding_lib.named_sharding(mesh, ("batch",) + (None,) * len(row), (b, *row))
  return StepSpecs(optimizer, abstract, shardings, rows(config.global_batch), rows(micro))
