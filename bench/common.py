"""What the three benchmarks share: the machine's matmul peak and copy bandwidth, a plain-text
table, the model to measure (the demo model, or random weights of a real Qwen2 shape), and
what a profiled step's time goes to."""

import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import isheep  # noqa: E402


def matmul_peak(device="cpu", dtype=torch.float32, reps=5):
    """The machine's matmul rate in GFLOP/s for dtype: the best of a few size^3 products
    (2048 on CPU, 8192 on a GPU)."""
    size = 2048 if torch.device(device).type == "cpu" else 8192
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))


def prepare_machine(threads):
    """Set torch's threads (if asked), keep freed memory in the process as isheep.run does on a machine without a GPU,
    and warn when another job already loads the CPU."""
    if threads:
        torch.set_num_threads(threads)
    isheep.keep_freed_memory()
    if os.getloadavg()[0] > 0.5:
        print(f"note: load average {os.getloadavg()[0]:.1f} before starting: another job shares the CPU, timings will be noisy")


# For a machine that can download nothing (--shape): the shapes of Qwen/Qwen2-0.5B's and
# Qwen/Qwen2-7B's config.json, weights drawn at random.
QWEN2 = {"0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
         "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_model_args(p):
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and compute")
    p.add_argument("--shape", choices=list(QWEN2), help="random weights of a Qwen2 shape, built on --device, instead of "
                                                         "the demo model (nothing to download)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the demo model's, read from its GGUF file)")
    p.add_argument("--tokenizer-vocab", action="store_true", help="--shape: a vocabulary of the tokenizer's size (every "
                                                                  "id decodes), instead of the shape's own")


def prepare_model_machine(args):
    """For the model benches: cuDNN's attention off, as isheep.main does, for every method
    measured; then the matmul peak of --dtype on --device, printed and returned (GFLOP/s)."""
    torch.backends.cuda.enable_cudnn_sdp(False)
    peak = matmul_peak(args.device, DTYPES[args.dtype])
    print(f"{args.dtype} matmul peak: {peak:.1f} GFLOP/s on {args.device}"
          + (f" ({torch.get_num_threads()} threads)" if args.device == "cpu" else ""))
    return peak


def load_bench_model(args, margs, training=False):
    """(tokenizer, model) as the bench's flags ask: the demo model through isheep.load_model, or a
    randomly initialised Qwen2 shape on --device in --dtype. A random model's tokens beyond
    the tokenizer's vocabulary decode to nothing, and it rarely says EOS: every row runs to the cap."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config
    margs.dtype = DTYPES[args.dtype]
    tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else \
        isheep.load_tokenizer(isheep.demo_model_ref(), margs)
    if not args.shape:
        from accelerate import Accelerator
        place = [isheep.Placement(margs.dtype)] if hasattr(isheep, "Placement") else []   # an older isheep: none
        model = isheep.load_model(isheep.demo_model_ref(), margs, Accelerator(cpu=args.device == "cpu"), *place,
                                  training=training)
        return tok, model.to(args.device)
    torch.manual_seed(0)
    dtype = torch.float32 if training and not margs.lora_rank else margs.dtype   # as isheep.load_model: fp32 master weights
    config = Qwen2Config(**dict(QWEN2[args.shape], **({"vocab_size": len(tok)} if args.tokenizer_vocab else {})),
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    with torch.device(args.device):   # initialised where it runs: a 7B model in a few seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.config.use_cache = not training
    return tok, model.train(training)


# What a step's time goes to: GPU kernels by name (cuBLAS/CUTLASS, the attention's, cub's sorts), CPU ATen ops by name.
# The first kind that matches counts; the rest is element-wise work (norms, rotary, activations) and overhead.
KINDS = [("matmul", r"gemm|gemv|cutlass::Kernel|nvjet|xmma|cublas|splitk|^aten::(mm|bmm|addmm|baddbmm)$"),
         ("attention", r"fmha|attention|flash|efficient|AttentionKernel"),
         ("sort (top-p)", r"sort|radix|onesweep"),
         ("softmax, cross-entropy, cumsum, search", r"softmax|nll_loss|scan|cumsum|searchsorted"),
         ("optimizer, grad norm", r"adam|multi_tensor|foreach|vector_norm"),
         ("indexing, copies, fills", r"index|copy|memcpy|memset|cat|gather|scatter|fill")]


def profile_by_kind(fn, device):
    """[(kind, events, ms)] of fn() under torch's profiler, most time first: a GPU's kernels (their device time), or
    a CPU's ATen ops (their self time, which adds up to the whole), sorted into KINDS."""
    from torch.profiler import ProfilerActivity, profile
    gpu = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        fn()
        sync(device)
    if gpu:
        events = [(e.name, 1, e.device_time_total) for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total]
    else:
        events = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total]
    total = {}
    for name, count, us in events:
        kind = next((k for k, pattern in KINDS if re.search(pattern, name, re.I)), "other (norms, rotary, activations)")
        n, ms = total.get(kind, (0, 0.0))
        total[kind] = n + count, ms + us / 1000
    return sorted(((kind, n, ms) for kind, (n, ms) in total.items()), key=lambda r: -r[2])


def copy_bandwidth(device, reps=5):
    """Device memory bandwidth in GB/s: bytes read + written by the best of a few 1 GiB copies."""
    a = torch.empty(2 ** 28, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best / 1e9


def sync(device):
    """Wait for the GPU's queued work, so that a timer reads finished work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
