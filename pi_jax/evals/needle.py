"""Needle-in-a-haystack tests beyond passkey: RULER's synthetic families (Hsieh et al. 2024).

Families (RULER's "retrieval" and "multi-hop tracing" tasks), on any text the user gives:
  single      one needle " One of the special magic numbers for KEY is: VALUE."; asked for KEY.
  multikey    the needle and `distractors` needles with other keys; asked for one key.
  multivalue  `values` needles with one key and different values; every value must come back.
  multiquery  `queries` needles with different keys, all asked at once; every value must come back.
  vartrack    a chain " VAR A = 12345." " VAR B = A." ... (`hops` links after the first) plus
              `chains - 1` distractor chains with other values; asked for every variable whose
              value is 12345 (all of the chain's variables).
Keys are adjective-noun pairs, values 7-digit numbers, variables 5 capital letters, haystack
starts and needle positions come from a seeded RNG: (seed, task, length, depth, trial) gives the
same prompt on every run.

Prompts are built at token level: lead (BOS when the tokenizer adds one) + task line + haystack
with the needles between its sentences + question and answer prefix. The haystack is the user's
text split into sentences here (after . ! ? and at blank lines; whitespace collapsed; a sentence
of more than MAX_SENTENCE_WORDS words is cut between words so a needle can sit near any depth),
taken in order from a seeded sentence, the last one cut at token level so that the prompt plus
the answer budget (`new_tokens`, the tokens greedy decoding may add) is exactly `length`:
nothing the model sees or writes lies past `length`.

Depth: where the asked needle (multiquery: the first key asked; vartrack: the chain's first
assignment) sits in the haystack, 0% = its start, 100% = just before the question (RULER's and
the needle-in-a-haystack convention; passkey counts k from the end instead). `depths` values are
evenly spaced over [0, 100]; the needle goes to the sentence boundary nearest the depth; the
other needles go to random boundaries (vartrack: the chain's later links after its first, in
order). Each trial also records `distance`, the real number of tokens from the asked needle's
first token to the end of the prompt, so the summary speaks passkey's k.

Scoring is RULER's string match on greedy decoding with the KV cache (pi_jax.generate): success
when every expected answer occurs in the continuation (cut at EOS); `recall` is the fraction
that occurs (RULER's per-sample score).

Summary (`summarize`), a cell passing when its accuracy is >= `threshold` (default 0.85, RULER's
bar: Llama-2-7B's average at 4K): per (task, length) the accuracy at each depth and the k_max
summary of pi_jax.evals.retrieval over the depths' real distances (k_max = largest distance with
every nearer one passing; what it hides when the nearest fails); per task `max_length` = the
largest length at which every depth passes, every shorter length passing too (None otherwise).
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
import time
from typing import Callable

import numpy as np

from pi_jax.evals import retrieval

TASKS = ("single", "multikey", "multivalue", "multiquery", "vartrack")
THRESHOLD = 0.85  # RULER: a length counts when the score is at least Llama-2-7B's at 4K (85.6)
MAX_SENTENCE_WORDS = 24  # longer sentences are cut so a needle can sit near any depth

NUMBERS_TASK = ("Some special magic numbers are hidden in the long text below. Memorize them: "
                "you will be asked about them after the text.")
NEEDLE = " One of the special magic numbers for {key} is: {value}."
ASK_ONE = (" What is the special magic number for {key} mentioned in the text above? The "
           "special magic number for {key} mentioned in the text above is")
ASK_ALL = (" What are all the special magic numbers for {key} mentioned in the text above? The "
           "special magic numbers for {key} mentioned in the text above are")
VARS_TASK = ("Variable assignments are hidden in the long text below. Memorize them and follow "
             "them: you will be asked about them after the text.")
VAR_FIRST = " VAR {name} = {value}."
VAR_NEXT = " VAR {name} = {prev}."
ASK_VARS = (" Find every variable that is assigned the value {value} in the text above, "
            "directly or through other variables. Answer: the variables assigned the value "
            "{value} are")

ADJECTIVES = ("amber ancient bitter brave brisk calm clever cold crimson curious daring distant "
              "dusty eager early faint fierce gentle giant golden hollow humble icy idle jolly "
              "kind lively lonely loud lucky mellow misty narrow noble odd pale proud quiet "
              "rapid rough rusty scarlet silent silver sleepy slow smooth solemn steady "
              "stormy sturdy swift tender tiny vivid wandering wild wise young").split()
NOUNS = ("anchor badger barrel beacon bridge canyon castle cedar comet compass cottage crow "
         "desert dragon falcon feather fjord forest fountain garden glacier harbor hammer "
         "island jaguar kettle ladder lantern lighthouse meadow mirror monastery mountain "
         "needle orchard otter palace pebble pepper piano quarry raven river saddle "
         "scarecrow shadow spruce squirrel tavern teapot thistle tiger tower trumpet "
         "valley violin walrus whistle willow windmill").split()


@dataclasses.dataclass(frozen=True)
class Settings:
  """How many needles each family hides (RULER's defaults for multikey, multivalue, ...)."""
  distractors: int = 3  # multikey: needles with other keys besides the asked one
  values: int = 4  # multivalue: values of the one key
  queries: int = 4  # multiquery: keys asked at once
  hops: int = 4  # vartrack: links after the first assignment of a chain
  chains: int = 2  # vartrack: chains (one asked, the others distractors)

  def __post_init__(self):
    for name, low in (("distractors", 0), ("values", 1), ("queries", 1), ("hops", 0),
                      ("chains", 1)):
      if getattr(self, name) < low:
        raise ValueError(f"needle --{name} must be >= {low}, got {getattr(self, name)}")


def parse_tasks(text: str) -> list[str]:
  tasks = [t.strip() for t in text.split(",") if t.strip()]
  bad = [t for t in tasks if t not in TASKS]
  if bad or not tasks:
    raise ValueError(f"--tasks {text!r}: unknown task {', '.join(map(repr, bad)) or '(none)'}; "
                     f"expected a comma list of {', '.join(TASKS)}")
  return list(dict.fromkeys(tasks))


def depth_grid(depths: int) -> list[float]:
  """`depths` depths in percent, evenly spaced over [0, 100] (one depth: 50%)."""
  if depths < 1:
    raise ValueError(f"--depths must be >= 1, got {depths}")
  if depths == 1:
    return [50.0]
  return [round(100.0 * i / (depths - 1), 2) for i in range(depths)]


_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u2019\u201d)\]]))\s+")


def split_sentences(text: str) -> list[str]:
  """Sentences: split after . ! ? (and a closing quote or bracket) and at blank lines; one of
  more than MAX_SENTENCE_WORDS words is cut into pieces of that many words."""
  out = []
  for para in _PARAGRAPH.split(text):
    for sentence in _SENTENCE_END.split(para.strip()):
      words = sentence.split()
      out += [" ".join(words[i:i + MAX_SENTENCE_WORDS])
              for i in range(0, len(words), MAX_SENTENCE_WORDS)]
  return out


class Haystack:
  """The user's text as sentences, tokenized on demand (only what prompts use)."""

  def __init__(self, tok, documents: list[tuple[str, str]]):
    self.tok = tok
    self.sentences = [s for _, text in documents for s in split_sentences(text)]
    if not self.sentences:
      names = ", ".join(doc_id for doc_id, _ in documents[:3])
      raise ValueError(f"haystack {names}: no sentences (the text is empty or whitespace)")
    self._ids: dict[int, list[int]] = {}

  def sentence_ids(self, index: int) -> list[int]:
    """Sentence `index` (wrapping around) as tokens, with its leading space."""
    index %= len(self.sentences)
    if index not in self._ids:
      self._ids[index] = self.tok.encode(" " + self.sentences[index], add_bos=False)
    return self._ids[index]

  def take(self, start: int, budget: int) -> list[list[int]]:
    """Sentences from `start` on (wrapping around), exactly `budget` tokens: the last is cut."""
    out, total, i = [], 0, start
    while total < budget:
      ids = self.sentence_ids(i)[:budget - total]
      if ids:
        out.append(ids)
        total += len(ids)
      i += 1
      if i - start > len(self.sentences) and total == 0:
        raise ValueError("haystack: its sentences tokenize to nothing")
    return out


@dataclasses.dataclass(frozen=True)
class NeedleTrial:
  task: str
  length: int  # the target L: prompt + new_tokens == L
  depth: float  # the requested depth, percent of the haystack before the asked needle
  trial: int
  ids: tuple[int, ...]
  answers: tuple[str, ...]  # every one must occur in the continuation
  new_tokens: int  # tokens greedy decoding may add
  needle_pos: int  # index in ids of the asked needle's first token
  actual_depth: float  # percent of the haystack's tokens before the asked needle
  needles: tuple[str, ...]  # the needle texts, for inspection

  @property
  def distance(self) -> int:
    """Tokens from the asked needle's first token to the end of the prompt (passkey's k)."""
    return len(self.ids) - self.needle_pos


def _keys(rng: random.Random, n: int) -> list[str]:
  pairs = rng.sample([(a, b) for a in ADJECTIVES for b in NOUNS], n)
  return [f"{a}-{b}" for a, b in pairs]


def _numbers(rng: random.Random, n: int, digits: int) -> list[str]:
  return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10 ** digits), n)]


def _variables(rng: random.Random, n: int) -> list[str]:
  names: list[str] = []
  while len(names) < n:
    name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
    if name not in names:
      names.append(name)
  return names


def _family(task: str, rng: random.Random, s: Settings):
  """(task line, needles in placing order, index of the asked needle, question, answers).

  Needles are (text, group): needles of one group keep their order in the prompt (a chain).
  """
  if task == "vartrack":
    values = _numbers(rng, s.chains, 5)
    names = _variables(rng, s.chains * (s.hops + 1))
    needles = []
    for c in range(s.chains):
      chain = names[c * (s.hops + 1):(c + 1) * (s.hops + 1)]
      needles.append((VAR_FIRST.format(name=chain[0], value=values[c]), c))
      needles += [(VAR_NEXT.format(name=n, prev=p), c) for p, n in zip(chain, chain[1:])]
    return (VARS_TASK, needles, 0, ASK_VARS.format(value=values[0]),
            names[:s.hops + 1])
  n_keys = {"single": 1, "multikey": 1 + s.distractors, "multivalue": 1,
            "multiquery": s.queries}[task]
  n_values = s.values if task == "multivalue" else n_keys
  keys = _keys(rng, n_keys)
  values = _numbers(rng, n_values, 7)
  if task == "multivalue":
    needles = [(NEEDLE.format(key=keys[0], value=v), i) for i, v in enumerate(values)]
    return NUMBERS_TASK, needles, 0, ASK_ALL.format(key=keys[0]), values
  needles = [(NEEDLE.format(key=k, value=v), i) for i, (k, v) in enumerate(zip(keys, values))]
  if task == "multiquery":
    asked = ", ".join(keys[:-1]) + " and " + keys[-1] if len(keys) > 1 else keys[0]
    return NUMBERS_TASK, needles, 0, ASK_ALL.format(key=asked), values
  return NUMBERS_TASK, needles, 0, ASK_ONE.format(key=keys[0]), values[:1]


class PromptBuilder:
  """Needle prompts of exactly `length` tokens (with the answer budget) from a haystack."""

  def __init__(self, tok, haystack: Haystack, settings: Settings = Settings()):
    self.tok = tok
    self.haystack = haystack
    self.settings = settings
    self._lead = tok.encode("")  # BOS, when the tokenizer adds one

  def _enc(self, text: str) -> list[int]:
    return self.tok.encode(text, add_bos=False)

  def new_tokens(self, answers) -> int:
    """Room for every answer, a separator each (", " / " and ") and a few tokens of slack."""
    return sum(len(self._enc(" " + a)) + 2 for a in answers) + 4

  def trial(self, task: str, length: int, depth: float, trial: int = 0,
            seed: int = 0) -> NeedleTrial:
    if task not in TASKS:
      raise ValueError(f"needle task {task!r}: expected one of {', '.join(TASKS)}")
    rng = random.Random(f"{seed}/{task}/{length}/{depth}/{trial}")  # str seeds: stable
    task_line, needles, asked, question, answers = _family(task, rng, self.settings)
    needle_ids = [self._enc(text) for text, _ in needles]
    head, question_ids = self._enc(task_line), self._enc(question)
    new = self.new_tokens(answers)
    fixed = len(self._lead) + len(head) + sum(map(len, needle_ids)) + len(question_ids) + new
    budget = length - fixed
    if budget < 0:
      raise ValueError(f"needle length {length} is too short for task {task}: its task line, "
                       f"needles, question and answer take {fixed} tokens; use --lengths of at "
                       f"least {fixed}")
    pieces = self.haystack.take(rng.randrange(len(self.haystack.sentences)), budget)
    bounds = np.cumsum([0] + [len(p) for p in pieces])  # token offset of each boundary
    at_depth = int(np.argmin(np.abs(bounds - depth / 100.0 * budget)))
    slots = self._slots(needles, asked, at_depth, len(pieces), rng)
    ids = list(self._lead) + head
    needle_pos = None
    for b in range(len(pieces) + 1):
      for i in sorted((i for i, slot in enumerate(slots) if slot == b)):
        if i == asked:
          needle_pos = len(ids)
        ids += needle_ids[i]
      if b < len(pieces):
        ids += pieces[b]
    ids += question_ids
    assert len(ids) + new == length and needle_pos is not None
    actual = 100.0 * bounds[at_depth] / budget if budget else 100.0
    return NeedleTrial(task, length, depth, trial, tuple(int(i) for i in ids), tuple(answers),
                       new, needle_pos, round(float(actual), 2), tuple(t for t, _ in needles))

  @staticmethod
  def _slots(needles, asked, at_depth, n_pieces, rng) -> list[int]:
    """The boundary index of each needle: the asked one at the depth, others at random ones;
    a group's needles (a vartrack chain) in order, the asked needle's chain from the depth on."""
    slots = [0] * len(needles)
    groups: dict[int, list[int]] = {}
    for i, (_, group) in enumerate(needles):
      groups.setdefault(group, []).append(i)
    for group, members in groups.items():
      if asked in members:
        rest = [m for m in members if m != asked]
        slots[asked] = at_depth
        for m, b in zip(rest, sorted(rng.randint(at_depth, n_pieces) for _ in rest)):
          slots[m] = b
      else:
        for m, b in zip(members, sorted(rng.randint(0, n_pieces) for _ in members)):
          slots[m] = b
    return slots

  def trials(self, tasks, lengths, depths: int, num_trials: int, seed: int) -> list[NeedleTrial]:
    return [self.trial(task, length, depth, t, seed) for task in tasks for length in lengths
            for depth in depth_grid(depths) for t in range(num_trials)]


def score(text: str, answers) -> dict:
  """RULER's string match: which answers occur in the continuation."""
  found = [a in text for a in answers]
  return {"success": all(found), "recall": float(np.mean(found))}


def run_trials(config, params, tok, trials: list[NeedleTrial], *, batch_size: int = 1,
               progress: Callable[[int], object] | None = None, generate_fn=None,
               run=None) -> list[dict]:
  """One result dict per trial: success, recall, the continuation, the needle's distance. run:
  the pi_jax.run.RunOptions to compute with."""
  from pi_jax.inputs import check_token_ids
  for t in trials:
    check_token_ids(np.asarray(t.ids), config.vocab_size,
                    f"needle prompt ({t.task}, length {t.length}, depth {t.depth})")
  bar = progress(len(trials)) if progress else None
  groups: dict[tuple, list[NeedleTrial]] = {}
  for t in trials:  # one compiled program per (prompt length, answer budget)
    groups.setdefault((len(t.ids), t.new_tokens), []).append(t)
  results = []
  for (_, new), group in groups.items():
    for b0 in range(0, len(group), batch_size):
      batch = group[b0:b0 + batch_size]
      t0 = time.perf_counter()
      outs = retrieval.generate_continuations(config, params, tok, [t.ids for t in batch], new,
                                              batch_size, generate_fn, run=run)
      seconds = (time.perf_counter() - t0) / len(batch)
      for t, (text, ids) in zip(batch, outs):
        results.append({"task": t.task, "length": t.length, "depth": t.depth,
                        "trial": t.trial, "actual_depth": t.actual_depth,
                        "distance": t.distance, "tokens": len(t.ids), "answers": list(t.answers),
                        **score(text, t.answers), "output": text,
                        "seconds": round(seconds, 3)})
      if bar is not None:
        bar.update(len(batch))
  if bar is not None:
    bar.close()
  order = {id(t): i for i, t in enumerate(trials)}  # results in the order of the trials
  key = {(t.task, t.length, t.depth, t.trial): order[id(t)] for t in trials}
  return sorted(results, key=lambda r: key[(r["task"], r["length"], r["depth"], r["trial"])])


def max_length(lengths, all_pass) -> int | None:
  """The largest length with every length up to it passing at every depth (None if none)."""
  best = None
  for length, ok in sorted(zip(lengths, all_pass)):
    if not ok:
      break
    best = length
  return best


def summarize(results: list[dict], threshold: float = THRESHOLD) -> dict:
  """{task: {"lengths": {L: per-depth accuracy and the k_max summary}, "max_length": ...}}."""
  cells: dict[str, dict[int, dict[float, list]]] = {}
  for r in results:
    cells.setdefault(r["task"], {}).setdefault(r["length"], {}).setdefault(
        r["depth"], []).append(r)
  out = {}
  for task in [t for t in TASKS if t in cells]:
    lengths = {}
    for length, by_depth in sorted(cells[task].items()):
      depths = sorted(by_depth)
      acc = [float(np.mean([r["success"] for r in by_depth[d]])) for d in depths]
      dist = [int(round(np.mean([r["distance"] for r in by_depth[d]]))) for d in depths]
      lengths[length] = {
          "depth": depths,
          "actual_depth": [float(np.mean([r["actual_depth"] for r in by_depth[d]]))
                           for d in depths],
          "k": dist,
          "accuracy": acc,
          "recall": [float(np.mean([r["recall"] for r in by_depth[d]])) for d in depths],
          "trials": [len(by_depth[d]) for d in depths],
          "mean_accuracy": float(np.mean(acc)),
          "all_depths_pass": all(a >= threshold for a in acc),
          **retrieval.distance_summary(dist, acc, threshold),
      }
    out[task] = task_summary(lengths, threshold)
  return out


def task_summary(lengths: dict, threshold: float) -> dict:
  """A task's lengths (each summarized by `summarize`) with max_length and its verdict."""
  lengths = dict(sorted(lengths.items(), key=lambda kv: int(kv[0])))
  best = max_length([int(L) for L in lengths], [s["all_depths_pass"] for s in lengths.values()])
  return {"lengths": lengths, "max_length": best, "threshold": threshold,
          "verdict": _length_verdict({int(L): s for L, s in lengths.items()}, best)}


def _length_verdict(lengths: dict, best) -> str:
  failing = [L for L, s in lengths.items() if not s["all_depths_pass"]]
  if best is None:
    return (f"the shortest length {min(lengths)} already fails at some depth, so max_length "
            f"is undefined; lengths passing at every depth: "
            f"{', '.join(str(L) for L in lengths if L not in failing) or retrieval.MISSING}")
  if not failing:
    return f"max_length = {best}: every length passes at every depth"
  return f"max_length = {best}; first failing length {min(L for L in failing if L > best)}"
