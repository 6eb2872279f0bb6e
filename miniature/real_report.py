"""The real-model experiment's report: the paper's tables (through miniature/report.py), the
base check, each finding as reproduced / not reproduced / not yet measured, and the commands."""

from __future__ import annotations

import os

from miniature.runner import Runner, commands_table
from pi_jax import files


FINDINGS = (  # what the paper reports, as miniature/report.findings names them
    ("(a)", "extrapolation past L blows up"),
    ("(b)", "at equal steps PI's perplexity at L' is at or below direct fine-tuning's"),
    ("(b)", "PI's in-window perplexity stays within 5% of the base's"),
    ("(c)", "PI's k_max reaches ~L' within the first checkpoints while direct fine-tuning's "
            "stays near L"),
)


def findings(res: dict) -> list[dict]:
  """Each finding of the paper: reproduced, not reproduced, or not yet measured."""
  from miniature import report as mini_report
  measured = []
  if "base" in res["models"] and res["target_window"] in res["models"]["base"]["ppl"]:
    try:
      measured = mini_report.findings(res)
    except KeyError:  # an arm between two of its evaluations
      measured = []
  out = []
  for tag, text in FINDINGS:
    hit = next((m for m in measured if m["finding"].startswith(tag) and (
        ("in-window" in m["finding"]) == ("in-window" in text))), None)
    if hit:
      out.append({**hit, "verdict": "reproduced" if hit["reproduced"] else "not reproduced"})
    else:
      out.append({"finding": f"{tag} {text}", "reproduced": None,
                  "verdict": "not yet measured", "numbers": "the run has not reached it"})
  return out


def markdown(res: dict, out: str) -> list[str]:
  from miniature import report as mini_report
  p, L, W = res["plan"], res["trained_window"], res["target_window"]
  bc = res["base_config"]
  lines = [
      f"## {res['base']}: {L} -> {W} ({p['factor']}x) by PI and by direct fine-tuning", "",
      f"Base: `{res['base']}` ({bc['num_layers']} layers, hidden {bc['hidden_size']}, "
      f"{bc['num_heads']} query / {bc['num_kv_heads']} key-value heads of dim {bc['head_dim']}, "
      f"RoPE base {bc['rope_theta']:g}, trained window {L}). Fine-tuning: `{res['config']}`, the "
      f"paper's recipe (AdamW 0.9/0.95, no weight decay, {p.get('warmup_steps') or 20}-step "
      f"warm-up from 10%, then "
      f"constant) at learning rate {p['learning_rate']:g} (miniature/real.py says how it was "
      f"chosen), {p['batch']} sequence(s) of {W} tokens per step, on the bundled PG-19 and "
      f"proof-pile stand-ins minus the held-out documents"
      + (f" (the first {p['ft_max_docs']} documents)" if p.get("ft_max_docs") else "")
      + f"; checkpoints at {', '.join(map(str, p['steps']))} steps. Evaluation on the "
      f"held-out documents {', '.join('`' + h + '`' for h in p['heldout'])}, each cut to "
      f"{W + 1} tokens: sliding-window perplexity with stride {p['stride']}"
      + (" (the paper's 256 would cost "
         f"{256 and round(p['stride'] / 256)}x more windows)" if p["stride"] > 256 else "")
      + f"; passkey retrieval at {W} (`{p['template']}` prompt template), "
      f"{p['passkey_depths']} distances x {p['passkey_trials']} key(s) per checkpoint, scored "
      f"by teacher forcing. Compute dtype: {p['compute_dtype'] or 'float32'}.", ""]
  bcheck = res.get("base_check")
  if bcheck:
    lines += ["### Base check", "", f"Status: **{bcheck['status']}**"
              + (f" (relative tolerance {bcheck['tolerance']:g} on perplexity, passkey "
                 f"accuracies equal). Reference `{bcheck['reference'][0]}`: "
                 f"{bcheck['perplexity']['reference']}, now {bcheck['perplexity']['now']}; "
                 f"`{bcheck['reference'][1]}` accuracy by distance "
                 f"{bcheck['passkey_accuracy']['reference']}, now "
                 f"{bcheck['passkey_accuracy']['now']}" if "reference" in bcheck else "")
              + ".", ""]
  if "base" in res["models"] and W in res["models"]["base"]["ppl"]:
    try:
      tables = mini_report.markdown(res)
      lines += tables[:tables.index("### The paper's findings, checked")]
    except KeyError:  # an arm between two of its evaluations: the next step writes the tables
      lines += ["(Tables: written after the next evaluation.)", ""]
    lines += [f"![{n}]({n})" for n in res.get("plots", [])] + [""]
  lines += ["### The paper's findings, checked", ""]
  for x in findings(res):
    lines.append(f"- {x['finding']}: **{x['verdict']}**. {x['numbers']}.")
  lines += ["", PAPER_SAYS]
  return lines + [""]


PAPER_SAYS = (  # /work/shared/PAPER.md, from the paper's text
    "For comparison, the paper (LLaMA 7B, PG-19, 64 sequences per step): extrapolation of the "
    "2048 base is > 10^3 at 4096 and beyond (Table 1); PI to 16384 goes from 112.13 at step 0 to "
    "7.05 after 200 steps at 16384 (Table 3); PI's k_max is L' at every step from 200 on, while "
    "direct fine-tuning to 8192 reaches 1792 after 200 steps and 2560 after 10000 (Table 4); "
    "the PI-32768 model's perplexity at 2048 is 7.23 against the base's 7.20 (Table 1).")


def write_report(out: str, command: str, res: dict, runner: Runner, status: str,
                 sizing_lines: list[str], wall_s: float) -> str:
  import datetime
  import platform
  earlier = [r for r in runner.records if r.get("earlier_run")]
  lines = [
      f"# pi_jax: Position Interpolation on a real model (`--{res['plan']['name']}`)", "",
      f"Written by `{command}` at "
      f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; status: "
      f"**{status}**; wall time {wall_s:.0f} s in this invocation on {os.cpu_count()} CPU "
      f"core(s) ({platform.machine()}, {platform.system()}) and {res.get('device', 'cpu')}"
      + (f"; {len(earlier)} of its {len(runner.records)} commands ran in an earlier "
         "invocation into the same folder" if earlier else "") + ".", "",
      "Every number below was produced by the commands listed at the end.", "",
      *sizing_lines, ""]
  lines += markdown(res, out)
  lines += ["## Commands", ""] + commands_table(runner.records)
  path = os.path.join(out, "report.md")
  files.write_text(path, "\n".join(lines))
  files.write_json(os.path.join(out, "results.json"),
                   {"status": status, "command": command, "results": res,
                    "findings": findings(res), "commands": runner.records},
                   indent=1, default=str)
  return path
