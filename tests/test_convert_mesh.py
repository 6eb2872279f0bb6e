"""A converted checkpoint restores onto a data x fsdp x tensor mesh of 8 fake CPU devices."""

from conftest import make_hf_model
from convert.to_pi_jax import convert
from tests.train_utils import run_on_devices

# Written out by hand from the logical table (embed->fsdp, heads/kv_heads/mlp/vocab->tensor),
# not computed by pi_jax.sharding, so a change in either shows up here.
_CHILD = r"""
import sys
from jax.sharding import NamedSharding, PartitionSpec as P
import pi_jax
from pi_jax import sharding
assert jax.device_count() == 8, jax.devices()
path = sys.argv[1]
mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
config, sharded = pi_jax.load_checkpoint(path, mesh=mesh)
_, plain = pi_jax.load_checkpoint(path)
want = {
  "embed": P("tensor", "fsdp"), "final_norm": P(None), "lm_head": P("fsdp", "tensor"),
  "layers/attn_norm": P(None, None), "layers/mlp_norm": P(None, None),
  "layers/wq": P(None, "fsdp", "tensor", None), "layers/wk": P(None, "fsdp", "tensor", None),
  "layers/wv": P(None, "fsdp", "tensor", None), "layers/wo": P(None, "tensor", None, "fsdp"),
  "layers/w_gate": P(None, "fsdp", "tensor"), "layers/w_up": P(None, "fsdp", "tensor"),
  "layers/w_down": P(None, "tensor", "fsdp"),
}
flat_s = {"/".join(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(sharded)[0]}
flat_p = {"/".join(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(plain)[0]}
assert sorted(flat_s) == sorted(want), sorted(flat_s)
for name, spec in want.items():
  a = flat_s[name]
  assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim), (name, a.sharding)
  n_split = 1
  for axes in spec:
    n_split *= 2 if axes else 1  # every mesh axis has size 2
  assert a.addressable_shards[0].data.size * n_split == a.size, name
  np.testing.assert_array_equal(np.asarray(a), np.asarray(flat_p[name]), err_msg=name)
print("OK", len(want))
"""


def test_load_checkpoint_onto_mesh_matches_plain_load(tmp_path):
  make_hf_model(tmp_path / "hf")  # 6 heads, 2 kv heads, mlp 96, vocab 128: all even
  convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
  out = run_on_devices(_CHILD, tmp_path / "ckpt", marker="OK")
  assert out.strip().endswith("OK 12")
