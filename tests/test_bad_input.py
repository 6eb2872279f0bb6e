"""Bad input, bad disks and impatient users (issue: "nothing lost, nothing silently wrong").

Each case builds the bad situation, asserts the clear error (naming the file or value) AND that
nothing was lost: the md5 of every pre-existing file under the paths involved is the same after.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

import pi_jax
from pi_jax import checkpoint
from tests.train_utils import (REPO, interrupt_after_steps, losses, run_train, subprocess_env,
                               train_cmd)

TINY_BASE = os.path.join(REPO, "assets", "tiny_base")


def md5_tree(*paths) -> dict[str, str]:
  """{file: md5} of every file under the paths (hidden ones too)."""
  out = {}
  for root in paths:
    root = str(root)
    if os.path.isfile(root):
      out[root] = hashlib.md5(open(root, "rb").read()).hexdigest()
      continue
    for folder, _, names in os.walk(root):
      for n in names:
        p = os.path.join(folder, n)
        out[p] = hashlib.md5(open(p, "rb").read()).hexdigest()
  return out


def run(cmd, timeout=300, **kw):
  return subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, **kw)


def eval_cli(args, capsys):
  """eval.py in this process: (exit code, stderr)."""
  sys.path.insert(0, REPO)
  import eval as eval_module
  code = eval_module.main(args)
  return code, capsys.readouterr().err


def to_hf_cli(args, capsys):
  from convert import to_hf
  code = to_hf.main(args)
  return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
  """A copy of the committed tiny model written by this version (so it has checksums)."""
  path = str(tmp_path_factory.mktemp("ck") / "tiny")
  config, params = pi_jax.load_checkpoint(TINY_BASE)
  checkpoint.save_checkpoint(path, config, params,
                             extra_files={"tokenizer/bytes.json":
                                          os.path.join(TINY_BASE, "tokenizer", "bytes.json")})
  return path


# --- 1. no command writes over its own input ---------------------------------------------------

def test_export_into_the_run_that_holds_the_checkpoint_is_refused(tmp_path, small_ckpt, capsys):
  run_dir = tmp_path / "RUN"
  shutil.copytree(small_ckpt, run_dir / "final")
  before = md5_tree(run_dir)
  code, err = to_hf_cli([str(run_dir / "final"), str(run_dir), "--force"], capsys)
  assert code == 1 and "contains the input" in err, err
  assert md5_tree(run_dir) == before
  code, err = to_hf_cli([str(run_dir / "final"), str(run_dir / "final" / "hf"), "--force"], capsys)
  assert code == 1 and "lies inside the input" in err, err
  assert md5_tree(run_dir) == before


def test_import_over_its_source_and_report_over_its_input_are_refused(tmp_path, small_ckpt,
                                                                     capsys):
  from convert.assemble import ConversionError
  from convert.to_pi_jax import convert
  src = tmp_path / "src"
  shutil.copytree(small_ckpt, src)
  before = md5_tree(src)
  with pytest.raises(ConversionError, match="is the input"):
    convert(str(src), str(src), force=True)
  with pytest.raises(ConversionError, match="contains the input"):
    convert(str(src), str(tmp_path), force=True)
  assert md5_tree(src) == before
  report = tmp_path / "a.json"
  report.write_text(json.dumps({"task": "passkey", "runs": [], "settings": {"ckpt": "x"}}))
  before = md5_tree(report)
  code, err = eval_cli(["report", str(report), "--json", str(report)], capsys)
  assert code == 2 and "is the input" in err, err
  assert md5_tree(report) == before


def test_train_refuses_a_workdir_around_its_init_checkpoint(tmp_path, small_ckpt):
  work = tmp_path / "run"
  shutil.copytree(small_ckpt, work / "final")
  before = md5_tree(work)
  r = run(train_cmd(work, ["steps=1", f"init_checkpoint={work / 'final'}", "model=null"]))
  assert r.returncode == 2 and "contains the input" in r.stderr, r.stderr
  assert md5_tree(work) == before


# --- 2, 3: sources that lie --------------------------------------------------------------------

def _hf_dir(tmp_path, layers=2):
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=layers, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(cfg)
  path = tmp_path / "hf"
  model.save_pretrained(path)
  return path


def _rewrite_header(file, edit):
  raw = open(file, "rb").read()
  n = struct.unpack("<Q", raw[:8])[0]
  header = json.loads(raw[8:8 + n])
  edit(header)
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  open(file, "wb").write(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


@pytest.mark.parametrize("damage", ["negative", "overlapping"])
def test_safetensors_header_lies_are_refused(tmp_path, damage):
  from convert.assemble import ConversionError
  from convert.to_pi_jax import convert
  src = _hf_dir(tmp_path)
  file = src / "model.safetensors"

  def edit(header):
    names = sorted((k for k in header if k != "__metadata__"),
                   key=lambda k: header[k]["data_offsets"][0])
    a, b = header[names[0]], header[names[1]]
    if damage == "negative":
      a["data_offsets"] = [-8, a["data_offsets"][1]]
    else:  # the second tensor reads the first one's bytes
      size = b["data_offsets"][1] - b["data_offsets"][0]
      b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]

  _rewrite_header(file, edit)
  before = md5_tree(src)
  with pytest.raises(ConversionError, match=r"model.safetensors: not a readable safetensors"):
    convert(str(src), str(tmp_path / "out"))
  assert md5_tree(src) == before and not os.path.exists(tmp_path / "out")


def test_a_tensor_in_two_safetensors_files_is_refused(tmp_path):
  from safetensors.numpy import load_file, save_file
  from convert.assemble import ConversionError
  from convert.to_pi_jax import convert
  src = _hf_dir(tmp_path)
  tensors = load_file(str(src / "model.safetensors"))
  name = "model.norm.weight"
  save_file({name: tensors[name] * 0 + 7}, str(src / "zz-extra.safetensors"))
  with pytest.raises(ConversionError, match=rf"'{name}' is in both model.safetensors and "
                                            r"zz-extra.safetensors"):
    convert(str(src), str(tmp_path / "out"))


def test_layers_beyond_the_configs_count_are_not_dropped(tmp_path):
  from convert.assemble import ConversionError
  from convert.to_pi_jax import convert
  src = _hf_dir(tmp_path, layers=3)
  cfg = json.load(open(src / "config.json"))
  cfg["num_hidden_layers"] = 2
  json.dump(cfg, open(src / "config.json", "w"))
  with pytest.raises(ConversionError, match=r"9 tensor\(s\) have no slot.*model\.layers\.2\."):
    convert(str(src), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_gguf_block_count_below_the_blocks_present_is_refused(tmp_path, monkeypatch):
  """A GGUF whose block_count says 1 while 2 blocks are present."""
  import gguf
  from conftest import make_hf_model
  from test_convert_gguf import TINY, write_gguf  # the suite's GGUF writer
  from convert.assemble import ConversionError
  from convert.to_pi_jax import convert
  original = gguf.GGUFWriter.add_block_count
  monkeypatch.setattr(gguf.GGUFWriter, "add_block_count",
                      lambda self, n: original(self, n - 1))
  model = make_hf_model(tmp_path / "hf", **TINY)
  path = write_gguf(model, tmp_path / "m.gguf")
  with pytest.raises(ConversionError, match=r"have no slot.*model\.layers\.1\."):
    convert(str(path), str(tmp_path / "out"))


# --- 4. config values that cannot work ---------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a number"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a finite positive number"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite positive number"),
    ({"sliding_window": 16}, "sliding_window=16 .* is not implemented"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 1e300, "rope_theta": 1e4}},
     "factor 1e\\+300 is absurd"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "disagree"),
    ({"rope_parameters": None, "rope_scaling": "linear"},
     "config.json: rope_scaling must be an object like"),
])
def test_hf_config_values_that_cannot_work_are_refused(tmp_path, change, message):
  from convert.assemble import ConversionError
  from convert.to_pi_jax import convert
  src = _hf_dir(tmp_path)
  cfg = json.load(open(src / "config.json"))
  cfg.update(change)
  json.dump(cfg, open(src / "config.json", "w"))
  with pytest.raises(ConversionError, match=message):
    convert(str(src), str(tmp_path / "out"))


def test_rope_scaling_written_as_a_json_string_is_read():
  from pi_jax.config import ModelConfig
  hf = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "vocab_size": 100,
        "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 2048,
        "rope_scaling": json.dumps({"rope_type": "linear", "factor": 4})}
  scaling = ModelConfig.from_hf(hf).rope_scaling
  assert (scaling.kind, scaling.factor, scaling.original_max_position_embeddings) == (
      "linear", 4.0, 512)


@pytest.mark.parametrize("spec,message", [
    ("data:0,fsdp:-1", "axis data has size 0; sizes are positive"),
    ("tensor:-3", "axis tensor has size -3")])
def test_mesh_sizes_that_would_divide_by_zero_are_refused(spec, message):
  from pi_jax import sharding
  with pytest.raises(ValueError, match=rf"mesh spec '{spec}': {message}"):
    sharding.make_mesh(spec)


@pytest.mark.parametrize("text,message", [
    ("0xv5e-16", "0 slices; give at least 1"), ("v5e:0x4", "every axis of the chip grid"),
    ("v5p:2x0x2", "every axis of the chip grid"), ("v5e-0", "0 chips is not a power of two")])
def test_tpu_topologies_with_zero_chips_are_refused(text, message):
  from pi_jax import tpu
  with pytest.raises(ValueError, match=message):
    tpu.parse_slice(text)


def test_absurd_scaling_on_the_command_line_is_refused(capsys):
  code, err = eval_cli(["passkey", "--ckpt", TINY_BASE, "--rope-scaling", "linear:1e300",
                        "--lengths", "200", "--depths", "1", "--trials", "1"], capsys)
  assert code == 2 and "absurd" in err, err


# --- 5. token ids outside the vocabulary -------------------------------------------------------

def test_token_ids_outside_the_vocabulary_are_named():
  import jax.numpy as jnp
  config, params = pi_jax.load_checkpoint(TINY_BASE)
  bad = jnp.asarray([[1, 2, config.vocab_size + 5]], jnp.int32)
  with pytest.raises(ValueError, match=rf"id {config.vocab_size + 5} at position \(0, 2\) is "
                                       rf"outside the model's vocabulary of size "
                                       rf"{config.vocab_size}"):
    pi_jax.forward(config, params, bad)
  with pytest.raises(ValueError, match=r"prompt token ids: id -1 "):
    pi_jax.generate(config, params, jnp.asarray([[1, -1]], jnp.int32), 2)
  from pi_jax.evals import perplexity
  with pytest.raises(ValueError, match=r"document d0: id 9999 "):
    perplexity.evaluate_perplexity(config, params, [("d0", np.array([1, 9999, 3], np.int32))],
                                   [4], 2)
  pi_jax.forward(config, params, bad % config.vocab_size)  # in range: runs


# --- 6. checksums ------------------------------------------------------------------------------

def _damage_largest_array_file(ckpt_params_dir, seed=0):
  biggest = max(glob.glob(os.path.join(ckpt_params_dir, "**", "d", "*"), recursive=True),
                key=os.path.getsize)
  data = bytearray(open(biggest, "rb").read())
  rng = random.Random(seed)
  mid = len(data) // 2
  for i in range(mid, mid + 64):
    data[i] = rng.randrange(256)
  open(biggest, "wb").write(data)
  return biggest


def test_random_bytes_in_a_parameter_file_are_detected(tmp_path, small_ckpt):
  ck = tmp_path / "ck"
  shutil.copytree(small_ckpt, ck)
  _damage_largest_array_file(str(ck / "params"))
  with pytest.raises(ValueError, match=r"params: array \['\w+'\](\['\w+'\])? does not match the "
                                       r"checksum recorded in .*ck/checksums.json"):
    pi_jax.load_checkpoint(str(ck))


def test_checkpoints_without_checksums_still_load():
  assert not os.path.exists(os.path.join(TINY_BASE, checkpoint.CHECKSUMS_FILE))
  config, params = pi_jax.load_checkpoint(TINY_BASE)
  assert params["embed"].shape == (config.vocab_size, config.hidden_size)


# --- 7-12: training runs -----------------------------------------------------------------------

QUICK = ["steps=4", "checkpoint_every=2", "keep_checkpoints=3"]


@pytest.mark.parametrize("damage", [
    "truncated_array",
    pytest.param("empty_metadata", marks=pytest.mark.slow),
    pytest.param("random_bytes", marks=pytest.mark.slow)])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, damage):
  work = tmp_path / "run"
  run_train(work, QUICK)
  reference = losses(work)
  step4 = work / "checkpoints" / "4"
  if damage == "truncated_array":
    f = max(glob.glob(str(step4 / "state" / "**" / "d" / "*"), recursive=True),
            key=os.path.getsize)
    os.truncate(f, os.path.getsize(f) // 2)
  elif damage == "empty_metadata":
    open(step4 / "state" / "_METADATA", "w").close()
  else:
    _damage_largest_array_file(str(step4 / "state"))
  damaged = md5_tree(step4)
  r = run_train(work, QUICK + ["steps=6"])
  assert "skipping checkpoint 4" in r.stderr and "resuming from step 2" in r.stderr, r.stderr
  assert len(r.stderr.splitlines()) < 30, r.stderr
  moved = glob.glob(str(work / "damaged_checkpoints" / "4-*"))
  assert len(moved) == 1  # kept, not deleted
  assert sorted(md5_tree(moved[0]).values()) == sorted(damaged.values())
  after = losses(work)
  assert sorted(after) == list(range(6))  # every step once
  for step in (0, 1, 2, 3):  # steps 2, 3 retrained from checkpoint 2: the same losses
    assert after[step] == pytest.approx(reference[step], rel=1e-6)


def test_a_second_run_on_a_workdir_exits_naming_the_holder(tmp_path):
  work = tmp_path / "run"
  os.makedirs(work)
  from pi_jax.train.workdir import WorkdirLock
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
       "from pi_jax.train.workdir import WorkdirLock; lock = WorkdirLock(sys.argv[2]);"
       "print('locked', flush=True); time.sleep(60)", REPO, str(work)],
      env=subprocess_env(), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    r = run(train_cmd(work, ["steps=1"]), timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"in use by another run (process {holder.pid}" in r.stderr, r.stderr
    assert not os.path.exists(work / "metrics.jsonl")
    with pytest.raises(ValueError, match=f"process {holder.pid}"):
      WorkdirLock(str(work))
  finally:
    holder.kill()
    holder.wait()
  WorkdirLock(str(work)).release()  # the lock died with its holder


def test_ctrl_c_saves_says_how_to_resume_and_resume_logs_each_step_once(tmp_path):
  """SIGINT like SIGTERM; the run resumes from the saved step; metrics.jsonl has every step
  once (the records past the checkpoint from the first attempt are trimmed)."""
  work = tmp_path / "run"
  proc = interrupt_after_steps(train_cmd(work, ["steps=400", "checkpoint_every=1000"]), work,
                               signal.SIGINT, tmp_path)
  out, err = proc.stdout, proc.stderr
  assert proc.returncode == 0, err
  assert "Traceback" not in err, err
  assert "SIGINT: saved checkpoint at step" in out and "rerun the same command" in out, out
  metrics = work / "metrics.jsonl"
  saved = int(out.split("saved checkpoint at step ")[1].split()[0])
  # Simulate a run that went on past its checkpoint before dying: extra records after it.
  with open(metrics, "a") as f:
    for step in range(saved, saved + 3):
      f.write(json.dumps({"step": step, "loss": 99.0}) + "\n")
  r = run_train(work, ["steps=" + str(saved + 2), "checkpoint_every=1000"])
  assert f"resuming from step {saved} (checkpoint {work / 'checkpoints' / str(saved)})" in r.stderr
  steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if '"step"' in l]
  assert steps == list(range(saved + 2)), steps
  assert 99.0 not in losses(work).values()


def test_stale_temporaries_of_a_killed_writer_are_cleaned(tmp_path, small_ckpt):
  out = tmp_path / "export"
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  stale = [tmp_path / f".export.tmp-{dead}-0123abcd", tmp_path / ".export.tmp-89abcdef"]
  for s in stale:
    os.makedirs(s / "sub")
    (s / "sub" / "big.bin").write_bytes(b"x" * 1000)
  live = tmp_path / f".export.tmp-{os.getppid()}-fedcba98"  # a live writer's: kept
  os.makedirs(live)
  from convert.to_hf import export
  export(small_ckpt, str(out))
  assert not any(s.exists() for s in stale) and live.exists()
  assert os.path.isfile(out / "model.safetensors")


def test_sigterm_during_a_conversion_leaves_no_temporary(tmp_path):
  src = _hf_dir(tmp_path)
  proc = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time, convert.assemble as a; orig = a.assemble_params\n"
       "def slow(*x, **k):\n  p = orig(*x, **k); print('assembled', flush=True); time.sleep(60)"
       "; return p\n"
       "a.assemble_params = slow\nimport convert.to_pi_jax as c; c.assemble_params = slow\n"
       "sys.exit(c.main(sys.argv[1:]))", str(src), str(tmp_path / "out")],
      env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "assembled"
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=60)
  assert proc.returncode == 128 + signal.SIGTERM
  assert not glob.glob(str(tmp_path / ".out.tmp-*")) and not os.path.exists(tmp_path / "out")


def test_an_error_at_start_up_closes_the_checkpoint_manager(tmp_path):
  work = tmp_path / "run"
  r = run(train_cmd(work, ["steps=1", "data=/nonexistent/corpus.jsonl"]))
  assert r.returncode == 2 and "nonexistent" in r.stderr, r.stderr
  assert "cannot schedule new futures" not in r.stderr and "Traceback" not in r.stderr, r.stderr
  assert len(r.stderr.splitlines()) < 15, r.stderr


# --- 13, 14: what cannot work or fit -----------------------------------------------------------

def test_a_batch_the_data_axes_do_not_divide_is_refused(tmp_path):
  work = tmp_path / "run"
  r = subprocess.run(train_cmd(work, ["steps=1", "global_batch=3", "mesh=data:2"]),
                     env=subprocess_env(devices=2), cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr
  assert "global_batch 3" in r.stderr and "2 data shards" in r.stderr, r.stderr


def test_what_cannot_fit_fails_before_loading(tmp_path, capsys):
  code, err = eval_cli(["passkey", "--ckpt", TINY_BASE, "--lengths", "100000000"], capsys)
  assert code == 2 and "--lengths 100000000: needs at least" in err, err
  assert "forward passes" not in err  # refused before the checkpoint was loaded
  r = run(train_cmd(tmp_path / "big", ["model=llama-7b", "steps=1"]))
  assert r.returncode == 2 and "the train state" in r.stderr and "GiB per device" in r.stderr, \
      r.stderr
  assert not os.path.exists(tmp_path / "big" / "tokenizer")  # before data and init
  assert not os.listdir(tmp_path / "big" / "checkpoints")


def test_unwritable_outputs_fail_before_the_evaluation(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  before = md5_tree(tmp_path)
  code, err = eval_cli(["passkey", "--ckpt", TINY_BASE, "--lengths", "200", "--depths", "1",
                        "--trials", "1", "--json", str(blocker / "out.json")], capsys)
  assert code == 2 and "--json file" in err and "cannot be written" in err, err
  assert "forward passes" not in err  # failed before any work
  assert md5_tree(tmp_path) == before


def test_a_window_beyond_every_document_runs_at_the_documents_length():
  """Same numbers as the longest document's length; compiled at that length, not the window."""
  from pi_jax.evals import perplexity as ppl
  config, params = pi_jax.load_checkpoint(TINY_BASE)
  docs = [("a", np.arange(1, 41, dtype=np.int32)), ("b", np.arange(3, 23, dtype=np.int32))]
  widths = []

  def factory(config, params, window, batch, **kw):
    widths.append(window)
    return ppl.make_window_scorer(config, params, window, batch, **kw)

  far, = ppl.evaluate_perplexity(config, params, docs, [1 << 20], 8, scorer_factory=factory)
  near, = ppl.evaluate_perplexity(config, params, docs, [39], 8)
  assert widths == [39]
  assert far.perplexity() == pytest.approx(near.perplexity(), rel=1e-6)
  assert far.window == 1 << 20


# --- issue 29: a resume that does not match its checkpoints refuses before touching them --------

def md5_run(work) -> dict[str, str]:
  """md5_tree of a workdir but its lock file (which holds the last holder's PID)."""
  return {k: v for k, v in md5_tree(work).items() if os.path.basename(k) != ".lock"}


def test_a_rerun_with_another_model_is_refused_before_touching_its_checkpoints(tmp_path):
  import re
  from pi_jax.train import config as config_lib
  from pi_jax.train import trainer as trainer_lib
  from tests import train_utils as tu
  work = tmp_path / "run"
  run_train(work, QUICK)
  before = md5_run(work)
  r = run(train_cmd(work, QUICK + ["model.num_layers=3"]))
  assert r.returncode == 2, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert ("holds checkpoints of another run setting (checkpoint 4): model.num_layers: 2 then, 3 "
          "now. Nothing was changed. Use a new workdir") in r.stderr, r.stderr
  base = config_lib.apply_overrides(config_lib.load_config_file(tu.TINY),
                                    tu.QUICK + QUICK + [f"workdir={work}"])
  for sets, message in [
      (["run.param_dtype=bfloat16"], "param_dtype: 'float32' then, 'bfloat16' now"),
      (["rope_scaling=linear:2"], "model.rope_scaling.kind: 'none' then, 'linear' now"),
      (["max_position_embeddings=128"], "model.max_position_embeddings: 64 then, 128 now"),
      (["grad_clip=1.0"], "grad_clip: None then, 1.0 now (clipping on or off")]:
    with pytest.raises(ValueError, match=re.escape(message)):
      trainer_lib.Trainer(config_lib.apply_overrides(base, sets))
  assert md5_run(work) == before and not os.path.exists(work / "damaged_checkpoints")
  # Run options may change; optimizer settings continue with a notice naming each change.
  r = run_train(work, QUICK + ["steps=6", "learning_rate=1e-3", "run.remat=full"])
  assert ("resuming with changed optimizer settings from step 4: learning_rate 0.003 -> 0.001, "
          "steps 4 -> 6") in r.stderr, r.stderr
  assert "resuming from step 4" in r.stderr and sorted(losses(work)) == list(range(6))


def test_a_state_of_another_shape_is_not_taken_for_a_damaged_checkpoint(tmp_path):
  """The second guard (no run_config.json, no model in the checkpoint: an older run): the
  restore fails, but the arrays' shapes say why, and nothing is moved."""
  from pi_jax.train import state as state_lib
  work = tmp_path / "run"
  run_train(work, QUICK)
  os.remove(work / "run_config.json")
  checkpoints = state_lib.RunCheckpoints(str(work), 3)
  try:
    step, meta = checkpoints.newest_meta()
    assert step == 4 and meta["model"]["num_layers"] == 2
  finally:
    checkpoints.close()
  import pi_jax.train.trainer as trainer_lib
  original = trainer_lib.resume_lib.check_resume
  before = md5_run(work)
  from pi_jax.train import config as config_lib
  from tests import train_utils as tu
  config = config_lib.apply_overrides(config_lib.load_config_file(tu.TINY),
                                      tu.QUICK + QUICK + [f"workdir={work}", "model.num_layers=3"])
  trainer_lib.resume_lib.check_resume = lambda *a, **k: []
  try:
    with pytest.raises(ValueError, match=r"checkpoints/4 holds a train state of another shape "
                       r"than this run's \(\d+ arrays, e.g. \[2, .*where this run has \d+, e.g. "
                       r"\[3, .*Nothing was moved"):
      trainer_lib.Trainer(config)
  finally:
    trainer_lib.resume_lib.check_resume = original
  assert md5_run(work) == before and not os.path.exists(work / "damaged_checkpoints")


@pytest.mark.parametrize("setting", ["learning_rate=nan", "learning_rate=inf", "b1=1.0",
                                     "b2=-0.1", "eps=0", "grad_clip=0", "weight_decay=-1",
                                     "final_lr_fraction=nan", "peak_tflops=-5"])
def test_hyperparameters_that_cannot_work_are_refused(setting):
  from pi_jax.train import config as config_lib
  from tests import train_utils as tu
  key = setting.split("=")[0]
  with pytest.raises(ValueError, match=rf"^{key} must be"):
    config_lib.apply_overrides(config_lib.load_config_file(tu.TINY), [setting])


def test_a_non_finite_update_is_never_saved(tmp_path):
  """lr 1e40 is a finite number, but its float32 update is not: the step is refused, no
  checkpoint holds it, and the message names the last good one."""
  work = tmp_path / "run"
  r = run_train(work, ["steps=3", "checkpoint_every=1", "learning_rate=1e40", "warmup_steps=0"],
                check=False)
  assert r.returncode == 1, r.stderr
  assert "non-finite parameter update at step 0" in r.stderr, r.stderr
  assert "no checkpoint was saved before it" in r.stderr, r.stderr
  assert not glob.glob(str(work / "checkpoints" / "[0-9]*"))


# --- issue 29: a config error, a bad workdir, a full disk: one line, nothing left behind --------

@pytest.mark.parametrize("setting,message", [
    ("rope_scaling=linera:4", "unknown RoPE scaling kind 'linera'"),
    ("seq_len=128", "seq_len 128 exceeds the model's window 64"),
    ("init_checkpoint=/nonexistent/ck", "/nonexistent/ck is not a pi_jax checkpoint")])
def test_a_config_error_is_one_line_and_creates_no_workdir(tmp_path, capsys, setting, message):
  sys.path.insert(0, REPO)
  import train
  from tests import train_utils as tu
  work = tmp_path / "run"
  args = ["--config", tu.TINY, "--no-progress", "--set", f"workdir={work}", "--set", setting]
  assert train.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err
  assert not os.path.exists(work)
  if "init_checkpoint" in setting:  # --print-config may come before the download
    assert train.main(args + ["--print-config"]) == 0
    return
  with pytest.raises(SystemExit) as e:
    train.main(args + ["--print-config"])
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_workdir_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path, capsys,
                                                                    read_only_dir):
  sys.path.insert(0, REPO)
  import train
  from tests import train_utils as tu
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  for work, message in [(a_file, f"workdir {a_file} is a file, not a folder"),
                        (read_only_dir / "run", f"workdir {read_only_dir / 'run'} cannot be "
                         "written"),
                        (read_only_dir, f"workdir {read_only_dir} cannot be written")]:
    assert train.main(["--config", tu.TINY, "--set", f"workdir={work}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
  assert a_file.read_text() == "mine"


@pytest.fixture
def read_only_dir(tmp_path):
  """A folder this process cannot write: mode 0555, or for root (which ignores modes) a
  read-only tmpfs (skipped where mounting is not allowed)."""
  folder = tmp_path / "ro"
  folder.mkdir()
  if os.geteuid() != 0:
    os.chmod(folder, 0o555)
    yield folder
    os.chmod(folder, 0o755)
    return
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                    capture_output=True).returncode:
    pytest.skip("root cannot mount a read-only tmpfs here")
  try:
    yield folder
  finally:
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def full_disk(tmp_path):
  """A 1 MiB tmpfs (too small for a tiny model's checkpoint): skipped where it cannot be mounted."""
  folder = tmp_path / "full"
  folder.mkdir()
  if os.geteuid() != 0 or subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
      capture_output=True).returncode:
    pytest.skip("needs root to mount a small tmpfs")
  try:
    yield folder
  finally:
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_during_a_checkpoint_or_a_conversion_is_one_line(tmp_path, full_disk,
                                                                      small_ckpt):
  work = full_disk / "run"
  r = run_train(work, QUICK, check=False)
  assert r.returncode == 1, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert (f"train.py: stopped: cannot write checkpoint 2 in {work}/checkpoints: no space left on "
          "device. The last complete checkpoint: none. Free space") in lines[0], r.stderr
  shutil.rmtree(work)
  hf = tmp_path / "hf"
  assert run([sys.executable, "-m", "convert.to_hf", small_ckpt, str(hf)]).returncode == 0
  for cmd, src in [("convert.to_hf", small_ckpt), ("convert.to_pi_jax", str(hf))]:
    r = run([sys.executable, "-m", cmd, src, str(full_disk / "out")])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    errors = ["error:" + x for x in r.stderr.split("error:")[1:]]  # after tqdm's bar
    assert len(errors) == 1 and len(errors[0].strip().splitlines()) == 1, r.stderr
    assert (f"error: cannot write {full_disk / 'out'}: no space left on device; nothing was "
            "written there") in errors[0], r.stderr
    assert os.listdir(full_disk) == []


def test_an_hf_export_is_readable_like_any_file(tmp_path, small_ckpt, capsys):
  mask = os.umask(0o022)
  try:
    assert to_hf_cli([small_ckpt, str(tmp_path / "hf")], capsys)[0] == 0
  finally:
    os.umask(mask)
  for name in os.listdir(tmp_path / "hf"):
    assert os.stat(tmp_path / "hf" / name).st_mode & 0o777 == 0o644, name


def test_a_cpu_host_prints_no_tpu_runtime_noise(tmp_path):
  """libtpu (a dev dependency, for compile-only checks) must stay silent on a CPU host, with
  JAX_PLATFORMS unset as a newcomer has it."""
  from pi_jax import platforms
  if platforms.tpu_present():
    pytest.skip("a TPU host: its TPU backend is wanted")
  env = {k: v for k, v in subprocess_env().items() if k != "JAX_PLATFORMS"}
  noise = ("host bounds", "worker hostname", "libtpu", "TPU_ACCELERATOR_TYPE")
  probe = subprocess.run([sys.executable, "-c", "import pi_jax, jax; print(jax.devices())"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert probe.returncode == 0 and "CpuDevice" in probe.stdout, probe.stderr
  r = subprocess.run(train_cmd(tmp_path / "run", ["steps=1", "max_docs=2", "eval_every=0",
                                                  "eval_sequences=0", "tensorboard=false"]),
                     env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  for text in (probe.stderr, r.stderr):
    assert not any(n in text for n in noise), text


def test_plot_titles_and_labels_are_not_clipped(tmp_path, monkeypatch):
  """Long titles (two checkpoints' paths) are wrapped and laid out inside the figure: every
  title and axis label lies within the figure, and no two of them overlap."""
  from pi_jax.evals import report
  figures = []
  real_save = report._save_figure
  monkeypatch.setattr(report, "_save_figure", lambda fig, path: (figures.append(fig),
                                                                 real_save(fig, path)))
  long = ("passkey retrieval: runs/smollm2_135m_32k/final (linear:4) vs "
          "checkpoints/smollm2-135m-instruct (none), 20 trials per cell")
  cells = {str(n): {"k": [0, 1, 2, 3], "accuracy": [1, 0.5, 0.2, 0]} for n in (1024, 2048)}
  runs = [{"rope_scaling": f"linear:{f} (ckpt runs/smollm2_135m_32k/final)", "lengths": cells}
          for f in (1, 4)]
  report.plot_passkey(runs, str(tmp_path / "passkey.png"), long)
  report.plot_perplexity([{"rope_scaling": "linear:4 (runs/a/final)", "results": [
      {"window": w, "perplexity": 10 + w / 1000} for w in (256, 512, 1024)]}],
      str(tmp_path / "ppl.png"), long)
  assert len(figures) == 2
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  for fig in figures:
    canvas = FigureCanvasAgg(fig)  # the figure was closed: draw it again as it was saved
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for t in ([fig._suptitle] if fig._suptitle else []) if t.get_text()]
    for ax in fig.axes:
      texts += [t for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    for t, box in zip(texts, boxes):
      assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= fig.bbox.x1 + 1 and \
          box.y1 <= fig.bbox.y1 + 1, t.get_text()
    for i in range(len(boxes)):
      for j in range(i + 1, len(boxes)):
        assert not boxes[i].overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())


def test_every_flag_of_a_user_command_has_help():
  """argparse prints a flag without help as its bare name: the user is left guessing."""
  import ast
  commands = ["train.py", "eval.py", "demo.py", "pi_jax/data/__main__.py",
              "pi_jax/train/export.py", *sorted(glob.glob(os.path.join(REPO, "convert", "*.py")))]
  missing = []
  for path in commands:
    path = os.path.join(REPO, path)
    for node in ast.walk(ast.parse(open(path).read())):
      if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
          and not any(k.arg == "help" for k in node.keywords)):
        missing.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
  assert not missing, missing


def test_outputs_under_a_file_or_on_a_read_only_folder_are_one_line(tmp_path, small_ckpt, capsys,
                                                                    read_only_dir):
  from pi_jax.data.__main__ import main as data_main
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  for out, message in [(a_file / "hf", f"OUT {a_file / 'hf'} cannot be written: {a_file} is not "
                        "a directory"),
                       (read_only_dir / "hf", "read-only")]:
    code, err = to_hf_cli([small_ckpt, str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert message in lines[0] or "cannot be written" in lines[0], err  # root: a ro mount
    assert data_main(["prepare", "pg19_standin", str(out), "--tokenizer", "bytes",
                      "--max-docs", "1", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot be written" in lines[0], lines
  assert a_file.read_text() == "mine" and os.listdir(read_only_dir) == []


def test_resume_check_reads_an_older_versions_record_as_this_version_does(tmp_path):
  """A checkpoint's model record from an older version (a retired key, a field it did not have)
  is not a difference; run options are not either (the old param_dtype key inside the model is
  read as the state's dtype); a real difference is."""
  from pi_jax.config import ModelConfig
  from pi_jax.train import resume
  new = ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=2, max_position_embeddings=64).to_dict()
  old = dict(new)
  old.update(scan_layers=True, remat="full", compute_dtype="bfloat16", param_dtype="float32",
             attention_block_size=512)
  notices = []
  assert resume.check_resume(str(tmp_path), {}, new, 4, {"model": old}, "float32",
                             log=notices.append) == [] and notices == []
  with pytest.raises(resume.ResumeMismatchError, match=r"model.num_heads: 2 then, 4 now"):
    resume.check_resume(str(tmp_path), {}, {**new, "num_heads": 4}, 4, {"model": old}, "float32")
  with pytest.raises(resume.ResumeMismatchError, match=r"param_dtype: 'float32' then"):
    resume.check_resume(str(tmp_path), {}, new, 4, {"model": old}, "bfloat16")
