"""Benchmark step 7's SFT: isheep.sft_step (packed rows) against padded batches and TRL, on the same examples.

What is measured and why: isheep.sft_step packs a rank's share of an optimizer step into one row per micro-batch:
examples back to back, no padding, attention cut at each example, logits only where a token is supervised. Its
peers run the same examples from the same weights:
  - shuffled, padded micro-batches: the usual loader (a random order cut into --micro examples, each padded);
  - the same steps padded: each timed step sorted by length and cut into --padded-parts micro-batches,
    every position's logits upcast to fp32 (isheep's loop before packing; its peak memory is the reference);
  - on a GPU (or with --trl), TRL's SFTTrainer: padding_free=True, SDPA, bf16, PEFT LoRA on the same layers (or
    full fine-tuning), no gradient checkpointing, --batch-size examples a step.
Each is timed on --steps optimizer steps drawn at random from an epoch of --n real pairs of the authors' data.

The FLOPs counted (the same useful work for every method): c x the parameters used in matmuls x the tokens (c = 6
for full fine-tuning; 4 for LoRA, whose frozen weights get no weight gradient; 6 x the adapters' own), plus the
lm_head at the supervised positions alone, plus causal attention (3 x 2 x length^2 x heads x head_dim a layer).
Over the time, that is the share of the matmul peak measured in the same run (the better of its start and its end:
the host's speed moves), and of the datasheet's on a known GPU. max_loss_diff: the largest gap between the packed and
the padded loss of the timed steps, from the same weights.
--profile: what one more packed step's time goes to, by kind (matmuls, and their rate against the peak; attention;
element-wise work; the optimizer), from torch's profiler: the GPU's kernels, or the CPU's ATen ops.

    python bench/sft.py --profile            # the demo model, full fine-tuning, fp32, 4 timed steps (~8 min on 2 cores)
    python bench/sft.py --n 24 --batch-size 4 --micro 2 --steps 1 --max-len 64 --threads 1   # smoke test
    python bench/sft.py --device cuda --dtype bf16 --shape 7b --lora-rank 16 --tokenizer DIR   # a GPU
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import isheep  # noqa: E402
from common import (DTYPES, add_model_args, load_bench_model, matmul_peak, prepare_machine,  # noqa: E402
                    prepare_model_machine, print_table, profile_by_kind, sync)

DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}   # dense TFLOP/s


def padded_step(model, optimizer, examples, micro_batches, autocast):
    """One optimizer step on right-padded micro-batches, every position's logits in fp32: each adds its summed token
    CE over the step's supervised tokens; clip to 1.0; AdamW. Returns the step's loss (a device scalar)."""
    step_tokens = sum(sum(y != -100 for y in examples[i][1]) for mb in micro_batches for i in mb)
    total = 0.0
    for mb in micro_batches:
        width = max(len(examples[i][0]) for i in mb)
        ids = torch.zeros((len(mb), width), dtype=torch.long)
        labels = torch.full((len(mb), width), -100, dtype=torch.long)
        mask = torch.zeros((len(mb), width), dtype=torch.long)
        for row, i in enumerate(mb):
            x, y = examples[i]
            ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        ids, labels, mask = (t.to(model.device) for t in (ids, labels, mask))
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum") / step_tokens
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def step_flops(model, examples, steps, lora, attention=True):
    """The useful FLOPs of these steps (see the docstring); attention=False: the matmuls' alone."""
    from torch import nn
    c, cfg = (4 if lora else 6), model.config
    linear = sum(m.weight.numel() for m in model.get_decoder().layers.modules() if isinstance(m, nn.Linear))
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    head = model.get_output_embeddings().weight.numel()
    width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    flops = 0
    for i in (i for s in steps for i in s):
        n, supervised = len(examples[i][0]), sum(y != -100 for y in examples[i][1][1:])
        flops += (c * linear + 6 * adapters) * n + c * head * supervised
        flops += 3 * 2 * n * n * width * cfg.num_hidden_layers if attention else 0
    return flops


def run_trl(model, tok, pairs, args, steps):
    """TRL's SFTTrainer on the timed steps' pairs: (seconds of `steps` optimizer steps, tokens, peak GPU bytes)."""
    import datasets
    import trl
    records = [dict(prompt=[{"role": "user", "content": isheep.user_turn(p["instruction"], p["input"])}],
                    completion=[{"role": "assistant", "content": p["output"]}]) for p in pairs]
    peft = None
    if args.lora_rank:
        import peft as peft_lib
        peft = peft_lib.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    config = trl.SFTConfig(output_dir="/tmp/isheep_trl", max_steps=steps + 1, per_device_train_batch_size=args.batch_size,
                           padding_free=True, bf16=args.dtype == "bf16", learning_rate=args.lr, lr_scheduler_type="constant",
                           max_length=None, report_to=[], save_strategy="no", logging_steps=10 ** 6,
                           use_cpu=args.device == "cpu", dataloader_num_workers=0)
    model.set_attn_implementation("sdpa")
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=tok, peft_config=peft)
    times, tokens = [], []

    class Clock(__import__("transformers").TrainerCallback):
        def on_step_begin(self, *a, **kw):
            sync(args.device)
            times.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            sync(args.device)
            times.append(time.perf_counter())
    trainer.add_callback(Clock())
    collate = trainer.data_collator
    trainer.data_collator = lambda rows: (lambda b: tokens.append(int(b["input_ids"].numel())) or b)(collate(rows))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = sum(times[k + 1] - times[k] for k in range(2, len(times) - 1, 2))   # the first step warms up
    return seconds, sum(tokens[1:]), torch.cuda.max_memory_allocated() if args.device == "cuda" else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/isheep_qwen72b_iter3_filtered.json"),
                   help="JSON list (or JSONL) of {instruction, input, output} pairs")
    p.add_argument("--n", type=int, default=512, help="pairs sampled from --data: an epoch of them")
    p.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step (isheep's --batch-size)")
    p.add_argument("--grad-accum", type=int, default=1, help="isheep's --grad-accum: packed rows per step (isheep's "
                   "default: 1, the whole step in one row)")
    p.add_argument("--padded-parts", type=int, default=4, help="micro-batches of each step of 'the same steps, padded' "
                   "(1, as isheep's rows, pads 16 examples at once: over 20 GB on the CPU; gpu.sh passes 1)")
    p.add_argument("--micro", type=int, default=4, help="examples per micro-batch of the shuffled padded baseline")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per method, after 1 untimed warm-up step")
    p.add_argument("--max-len", type=int, default=1024, help="tokenize_pair's max_len")
    p.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning (fp32 master weights); >0: isheep's LoRA")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (speed does not depend on it)")
    p.add_argument("--trl", action="store_true", help="also run TRL's SFTTrainer (always on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, the epoch and the baseline's shuffle")
    p.add_argument("--profile", action="store_true", help="then profile one more packed step: what its time goes to")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice); on a shared machine use fewer")
    add_model_args(p)
    args = p.parse_args()
    prepare_machine(args.threads)
    peak = prepare_model_machine(args)
    gpu = args.device == "cuda"
    datasheet = next((v for k, v in DATASHEET_BF16.items() if gpu and k in torch.cuda.get_device_name()), None)

    path = Path(args.data)   # real pairs, tokenized as isheep.sft does
    try:
        pairs = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        pairs = isheep.read_jsonl(path)
    pairs = [dict(p, input=p.get("input") or "") for p in random.Random(args.seed).sample(pairs, min(args.n, len(pairs)))]
    tok, model = load_bench_model(args, SimpleNamespace(trust_remote_code=False, tp=False, lora_rank=args.lora_rank),
                                  training=True)
    kept = [(p, e) for p, e in ((p, isheep.tokenize_pair(tok, p, args.max_len)) for p in pairs) if e is not None]
    pairs, examples = [p for p, _ in kept], [e for _, e in kept]

    # The epoch as isheep.sft draws it; K of its full steps timed, one more to warm up. The baseline reshuffles
    # exactly the timed steps' examples, so every method sees the same ones.
    order = random.Random(args.seed).sample(range(len(examples)), len(examples))
    epoch = [order[s:s + args.batch_size] for s in range(0, len(order) - args.batch_size + 1, args.batch_size)]
    k = min(args.steps, len(epoch) - 1)
    if k < 1:
        p.error(f"{len(examples)} examples make {len(epoch)} full steps; need at least 2 (raise --n)")
    *timed, warmup = random.Random(args.seed).sample(epoch, k + 1)
    shuffled = [i for s in timed for i in s]
    random.Random(args.seed).shuffle(shuffled)
    accum = args.grad_accum

    def cut(step, parts):
        step = sorted(step, key=lambda i: len(examples[i][0]))
        return [step[j * len(step) // parts:(j + 1) * len(step) // parts] for j in range(parts)]
    plans = {"shuffled, padded micro-batches": [[shuffled[s + m:s + m + args.micro] for m in range(0, args.batch_size, args.micro)]
                                                for s in range(0, len(shuffled), args.batch_size)],
             "the same steps, padded": [cut(s, args.padded_parts) for s in timed]}
    lengths = sorted(len(e[0]) for e in examples)
    print(f"{len(examples)} examples, tokens per example: median {lengths[len(lengths) // 2]}, mean "
          f"{sum(lengths) / len(lengths):.0f}, max {lengths[-1]}; {len(epoch)} steps an epoch, {k} timed, "
          f"{args.batch_size} examples a step")

    lora = bool(args.lora_rank)
    params = isheep.add_lora(model, args.lora_rank, 2 * args.lora_rank) if lora else \
        [q for q in model.parameters() if q.requires_grad]
    model.train()
    autocast = args.dtype == "bf16"
    from accelerate import Accelerator
    acc = Accelerator(cpu=not gpu, mixed_precision="bf16" if autocast else "no", gradient_accumulation_steps=accum)
    start = {name: t.clone() for name, t in model.state_dict().items()}
    flops = step_flops(model, examples, timed, lora)
    tokens = sum(len(examples[i][0]) for s in timed for i in s)

    def fresh():   # every method starts from the same weights and a fresh AdamW (fused, as isheep's)
        model.load_state_dict(start)
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)

    # max_loss_diff: each timed step's loss, packed and padded, from the starting weights (lr 0: they stay)
    diffs = []
    for step in timed:
        frozen = torch.optim.SGD(params, lr=0.0)
        model.set_attn_implementation(isheep.PACKED)
        packed = isheep.sft_step(model, frozen, examples, step, acc=acc)[0].item()
        model.set_attn_implementation("sdpa")
        diffs.append(abs(packed - float(padded_step(model, frozen, examples, cut(step, args.padded_parts), autocast))))

    results = []
    for method in ["shuffled, padded micro-batches", "the same steps, padded", "isheep.sft_step, packed"]:
        optimizer = fresh()
        packed = method.startswith("isheep")
        model.set_attn_implementation(isheep.PACKED if packed else "sdpa")
        run = (lambda s: isheep.sft_step(model, optimizer, examples, s, acc=acc)) if packed else \
            (lambda s: padded_step(model, optimizer, examples, s, autocast))
        run(warmup if packed else cut(warmup, args.padded_parts))
        sync(args.device)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for step in (timed if packed else plans[method]):
            run(step)
        sync(args.device)
        seconds = time.perf_counter() - t0
        computed = tokens if packed else sum(len(mb) * max(len(examples[i][0]) for i in mb) for s in plans[method] for mb in s)
        results.append(dict(method=method, s=seconds, computed=computed, memory=torch.cuda.max_memory_allocated() if gpu else 0))
        print(f"  {method}: {seconds:.1f} s, {tokens / seconds:.0f} real tok/s", flush=True)
        if packed and args.profile:   # one more step, the first timed one again: what its time goes to
            kinds = profile_by_kind(lambda: run(timed[0]), args.device)
    if gpu or args.trl:
        model.load_state_dict(start)
        try:
            seconds, trl_tokens, memory = run_trl(model if not lora else load_bench_model(
                args, SimpleNamespace(trust_remote_code=False, tp=False, lora_rank=args.lora_rank), training=True)[1],
                tok, [pairs[i] for s in [warmup] + timed for i in s], args, k)
            results.append(dict(method="TRL SFTTrainer, padding_free", s=seconds * tokens / max(trl_tokens, 1),
                                computed=trl_tokens, memory=memory))
            print(f"  TRL: {seconds:.1f} s for {trl_tokens} tokens", flush=True)
        except Exception as e:
            print(f"note: TRL skipped: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")

    if (again := matmul_peak(args.device, DTYPES[args.dtype])) > peak:   # a peak: the better of the run's two
        print(f"{args.dtype} matmul peak, measured again at the end: {again:.1f} GFLOP/s (taken)")
        peak = again
    base, ours = results[0], results[2]
    trl = next((r for r in results if r["method"].startswith("TRL")), None)
    print()
    print_table(["method", "steps", "time_s", "real_tok", "computed_tok", "real_tok/s", "ratio", "peak_frac", "datasheet_frac",
                 "peak_mem_GB"],
                [[r["method"], k, f"{r['s']:.1f}", tokens, r["computed"], f"{tokens / r['s']:.0f}", f"{base['s'] / r['s']:.2f}",
                  f"{flops / r['s'] / 1e9 / peak:.3f}", f"{flops / r['s'] / datasheet:.3f}" if datasheet else "-",
                  f"{r['memory'] / 1e9:.2f}" if gpu else "-"] for r in results])
    print(f"({'LoRA r=' + str(args.lora_rank) if lora else 'full fine-tuning'}, {args.dtype}; {flops / tokens / 1e9:.2f} GFLOP a "
          f"token; peak_frac: over the {peak:.1f} GFLOP/s measured here; max_loss_diff: packed vs padded, {k} steps)")
    if args.profile:
        busy, mm = sum(ms for _, _, ms in kinds), next((ms for kind, _, ms in kinds if kind == "matmul"), 0)
        rate = step_flops(model, examples, timed[:1], lora, attention=False) / (mm / 1e3) / 1e9 if mm else 0
        print(f"one packed step ({sum(len(examples[i][0]) for i in timed[0])} tokens) under the profiler: {busy / 1e3:.2f} s "
              f"of {'kernel' if gpu else 'CPU'} time (a timed step: {ours['s'] / k:.2f} s); its matmuls ran at "
              f"{rate / peak:.2f} of the measured peak's rate")
        print_table(["kind", "events", "ms", "share"], [[kind, n, f"{ms:.1f}", f"{ms / busy:.2f}"] for kind, n, ms in kinds])
    summary = dict(ratio_vs_padded=f"{base['s'] / ours['s']:.3f}", ratio_vs_same_steps_padded=f"{results[1]['s'] / ours['s']:.3f}",
                   peak_fraction=f"{flops / ours['s'] / 1e9 / peak:.4f}", max_loss_diff=f"{max(diffs):.2e}",
                   tok_s=f"{tokens / ours['s']:.1f}", peak_gflops=f"{peak:.1f}", steps=k, batch_size=args.batch_size)
    if datasheet:
        summary["datasheet_fraction"] = f"{flops / ours['s'] / datasheet:.4f}"
    if gpu:
        summary.update(peak_mem_gb=f"{ours['memory'] / 1e9:.2f}", peak_mem_gb_padded=f"{results[1]['memory'] / 1e9:.2f}")
    if trl:
        summary["ratio_vs_trl"] = f"{trl['s'] / ours['s']:.3f}"
    if args.profile:
        summary.update(matmul_share=f"{mm / busy:.3f}", matmul_rate_fraction=f"{rate / peak:.3f}")
    print(" ".join(f"{key}={v}" for key, v in summary.items()))


if __name__ == "__main__":
    main()
