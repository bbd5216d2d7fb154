"""Every GPU measurement in one process, each beside the plain recipe (`bench/anchor_gpu.py`, a verbatim copy of
`../shared/bench/anchor_gpu.py`, imported and run here) and beside the planner's prediction.

    python bench/gpu_run.py               # on one H100/H200: real-size random-weight models, ~4.5 minutes
    python bench/gpu_run.py --dry-run     # CPU: every row at reduced size, so CI proves the script runs

Rows, in the order they run (a row that would not finish inside --budget-s is skipped and says so, so the run
always ends in time and keeps what it measured):
- the machine: bf16 matmul ceiling (the recipe's own), pinned host -> device copy bandwidth (the planner's offload
  cost), the CUDA context (memory the driver holds outside torch's allocator);
- klein-4b at 1024 px: the recipe, then our step at equal work, then our modes (no checkpointing, int8 / fp8
  base, group offload, TREAD, all modules, the compiled speed / memory / budget modes: each compile takes a
  minute, and the int4 base last: optimum-quanto may first build its CUDA kernels);
- one klein-9b and one dev step at 1024 px, recipe and ours;
- dev's Mistral text encoder cut at 30 layers (text-only MistralModel, real shape, 17.3B parameters), batch 8 x 512
  tokens, with and without group offload of its decoder layers, through our PromptEncoder;
- Qwen3-4B text encoding (the recipe's and ours) and VAE encoding, beside the planner's encode-stage predictions.

Every memory row has the measured peak allocated and reserved memory beside the planner's predicted peak and its
predicted need (peak + headroom), so the headroom constants (CUDA context, allocator reserve) can be calibrated.
Weights are random (speed and memory do not depend on them); nothing is downloaded. Output: JSON lines on stdout
and in $OUT/gpu_run.jsonl, then a markdown table ($OUT/gpu_run.md) for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_step  # noqa: E402  (bench/train_step.py: our step beside the recipe)

# Reduced configs for --dry-run: the flavours' structure (guidance embedder for dev), a few blocks, small width.
_DRY = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
            joint_attention_dim=3 * 16, axes_dims_rope=(4, 4, 4, 4))
DRY_TRANSFORMER = {"klein-4b": dict(_DRY, num_layers=2, num_single_layers=2, guidance_embeds=False),  # TREAD's span
                   "klein-9b": dict(_DRY, guidance_embeds=False), "dev": dict(_DRY, guidance_embeds=True)}
MISTRAL_24B_TEXT = dict(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e9,
                        max_position_embeddings=131072)
DRY_MISTRAL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, vocab_size=151936, max_position_embeddings=40960)
DRY_QWEN = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                vocab_size=1000, max_position_embeddings=1024)

TREAD = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]}
# klein-4b modes: (label, options of train_step.ours, seconds it may take on the GPU)
KLEIN_4B_MODES = [
    ("no checkpointing", dict(checkpointing=False), 10),
    ("int8 base", dict(precision="int8-quanto"), 20),
    ("fp8 base (torchao)", dict(precision="fp8-torchao"), 20),
    ("group offload", dict(enable_group_offload=True), 30),
    ("TREAD 0.5", dict(tread=TREAD), 10),
    ("all modules", dict(preset="all"), 10),
]
# Last of all: on CUDA, optimum-quanto builds its int4 kernels with nvcc the first time (minutes, if nvcc is there)
INT4_MODE = [("int4 base", dict(precision="int4-quanto"), 20)]
COMPILE_MODES = [
    ("speed mode: compile, no ckpt", dict(checkpointing=False, compile_transformer=True), 80),
    ("memory mode: compile + ckpt", dict(compile_transformer=True), 80),
    ("budget 14 GiB: compile", dict(compile_transformer=True, vram_budget_gib=14.0), 80),
]


class Run:
    """Rows, the time budget and the output files."""

    def __init__(self, dry: bool, budget_s: float, out: Path):
        self.dry, self.budget_s, self.out = dry, budget_s, out
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.recipes: dict[str, dict] = {}  # flavour -> the recipe's row, for the ratios
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = (out / "gpu_run.jsonl").open("w")

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def emit(self, row: dict) -> None:
        row = {**row, "t_s": round(time.perf_counter() - self.start, 1)}
        line = json.dumps(row, default=str)
        print(line, flush=True)
        self.jsonl.write(line + "\n")
        self.jsonl.flush()
        self.rows.append(row)
        (self.out / "gpu_run.md").write_text(markdown(self))  # kept up to date: a killed run keeps its table

    def row(self, name: str, estimate_s: float, fn, *args, **kwargs):
        """Run one measurement unless the budget cannot hold it; errors are recorded, never fatal."""
        if not self.dry and self.left_s() < estimate_s:
            self.emit({"what": name, "skipped": f"time budget: {self.left_s():.0f} s left, needs ~{estimate_s} s"})
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # one failing row must not cost the others
            self.emit({"what": name, "error": repr(e)[:400]})
            return None
        finally:
            free()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def cuda_memory(device) -> dict:
    if device.type != "cuda":
        return {"peak_gib": None, "reserved_gib": None}
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def with_plan(row: dict, prediction) -> dict:
    """The planner's peak and need (peak + headroom) beside a measured row."""
    from flux2lora.planner import headroom_gib

    peak = prediction.peak_gib
    return {**row, "planned_peak_gib": peak, "planned_needs_gib": peak + headroom_gib(peak)}


def machine(run: Run, anchor, device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        free_b, total_b = torch.cuda.mem_get_info()
        torch.zeros(1, device=device)
        context = (total_b - free_b) / 2**30 - torch.cuda.memory_reserved() / 2**30
        run.emit({"what": "machine", "gpu": torch.cuda.get_device_name(), "total_gib": total_b / 2**30,
                  "cuda_context_gib": context, "torch": torch.__version__})
        ceiling = anchor.matmul_ceiling(device, 8192)
        run.emit({"what": "bf16 matmul ceiling", "tflops": ceiling / 1e12})
    size = (2**31 if device.type == "cuda" else 2**22)  # 2 GiB (GPU) / 4 MiB (dry run)
    host = torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
    target = torch.empty(size, dtype=torch.uint8, device=device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        target.copy_(host, non_blocking=True)
        anchor.sync(device)
        times.append(time.perf_counter() - t0)
    gbps = size / sorted(times)[len(times) // 2] / 1e9
    run.emit({"what": "host -> device copy, pinned", "bytes": size, "gb_per_s": gbps})
    return gbps


def training_rows(run: Run, anchor, device, flavour: str, modes, *, recipe_too=True) -> None:
    """The recipe's step and ours (equal work), then `modes`, for one flavour at 1024 px (dry: 64 px)."""
    res, text_len = (32, 8) if run.dry else (1024, 512)
    steps = 1 if run.dry else (3 if flavour == "dev" else 5)
    config = DRY_TRANSFORMER[flavour] if run.dry else anchor.TRANSFORMER[flavour]
    if run.dry:
        anchor.TRANSFORMER[f"dry-{flavour}"] = config
    if recipe_too:
        def recipe_row():
            # the recipe's own peak (max allocated; it resets the counters when it returns)
            rec = anchor.lora_step_bench(f"dry-{flavour}" if run.dry else flavour, res, True, device,
                                         steps=steps, text_len=text_len)
            run.emit(with_plan({**rec, "what": f"{flavour} recipe (diffusers + peft)"},
                               train_step.planned(flavour, 1024, 512)))
            run.recipes[flavour] = rec
        run.row(f"{flavour} recipe", 40 if flavour == "dev" else 15, recipe_row)
    recipe = run.recipes.get(flavour)
    equal_work = [("equal work", {}, 40 if flavour == "dev" else 10)] if recipe_too else []
    for label, options, estimate in equal_work + list(modes):
        options = dict(options)
        if run.dry and options.get("compile_transformer"):
            options["compile_backend"] = "eager"  # dynamo's tracing only: the row's code path, not a compiler

        def ours_row(label=label, options=options):
            rec = train_step.ours(config, res, text_len, device, steps, label=f"{flavour} ours: {label}",
                                  flavour=flavour, anchor=anchor, warmup=0 if run.dry else 2, echo=False,
                                  **options)
            real = {k: v for k, v in options.items() if k != "compile_backend"}
            rec = with_plan(rec, train_step.planned(flavour, 1024, 512, **real))
            if recipe:
                rec["recipe_over_ours"] = recipe["step_s_median"] / rec["step_s_median"]
            run.emit(rec)
        run.row(f"{flavour} ours: {label}", estimate, ours_row)


def mistral_rows(run: Run, device) -> None:
    """dev's text encoder cut at 30 layers, batch 8 x 512 tokens, without and with group offload."""
    from transformers import AutoTokenizer, MistralConfig, MistralModel

    from flux2lora.models import apply_group_offload
    from flux2lora.planner import TextPlan, predict_text
    from flux2lora.text_encoding import PromptEncoder
    from flux2lora.tiny import make_tiny_model

    layers = (1, 2, 3) if run.dry else (10, 20, 30)
    shape = DRY_MISTRAL if run.dry else MISTRAL_24B_TEXT
    tokens, batch = (32, 2) if run.dry else (512, 8)
    with tempfile.TemporaryDirectory() as tmp:
        # the tiny dev model's offline tokenizer and chat template: the real prompt formatting (ids < vocab)
        tokenizer = AutoTokenizer.from_pretrained(make_tiny_model(Path(tmp) / "dev", "dev") / "tokenizer")
    prompts = [f"sks style, photo number {i} of a red circle on a blue background" for i in range(batch)]
    for offload in (False, True):
        def encode_row(offload=offload):
            free()
            prev = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            with torch.device(device):  # random init on the GPU is fast; offload then moves it to host memory
                model = MistralModel(MistralConfig(**{**shape, "num_hidden_layers": max(layers),
                                                      **({"vocab_size": len(tokenizer)} if run.dry else {})})).eval()
            torch.set_default_dtype(prev)
            model.requires_grad_(False)
            if offload:
                apply_group_offload(model, device, "block_level", 1, use_stream=device.type == "cuda")
            free()
            encoder = PromptEncoder(tokenizer, model, "mistral3", layers, tokens, device)
            encoder.encode(prompts)  # warm-up
            times = []
            for _ in range(1 if run.dry else 3):
                t0 = time.perf_counter()
                out = encoder.encode(prompts)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            median = sorted(times)[len(times) // 2]
            rec = {"what": f"dev text encoder (Mistral 24B text, 30 layers){' offloaded' if offload else ''}",
                   "layers_run": max(layers), "batch": batch, "tokens": tokens, "captions_per_s": batch / median, "step_s_median": median,
                   "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
                   "out_shape": list(out.shape), **cuda_memory(device)}
            run.emit(with_plan(rec, predict_text(TextPlan("dev", batch=8, layers=(10, 20, 30),
                                                          group_offload=offload))))
            del model, encoder
        run.row(f"dev text encoder{' offloaded' if offload else ''}", 45 if offload else 20, encode_row)


def qwen_and_vae_rows(run: Run, anchor, device) -> None:
    """Qwen3-4B text encoding (the recipe's full and cut models, then ours) and VAE encoding, beside the planner."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    from flux2lora.planner import LatentPlan, TextPlan, predict_latents, predict_text
    from flux2lora.text_encoding import PromptEncoder
    from flux2lora.tiny import make_tiny_model

    dry = run.dry

    def recipe_text():
        for rec in anchor.text_encoder_bench(device, 2 if dry else 16, 3 if dry else 27, dry):
            run.emit({**rec, "what": f"klein-4b recipe: {rec['what']}"})
    run.row("klein-4b recipe text encode", 20, recipe_text)

    def ours_text():
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = AutoTokenizer.from_pretrained(make_tiny_model(Path(tmp) / "k", "klein-4b") / "tokenizer")
        layers, batch, tokens = ((1, 2, 3), 2, 32) if dry else ((9, 18, 27), 16, 512)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            shape = {**DRY_QWEN, "vocab_size": len(tokenizer)} if dry else QWEN3_4B
            model = Qwen3Model(Qwen3Config(**shape, num_hidden_layers=max(layers))).eval()
        torch.set_default_dtype(prev)
        free()
        encoder = PromptEncoder(tokenizer, model.requires_grad_(False), "qwen3", layers, tokens, device)
        prompts = [f"sks style, photo {i}" for i in range(batch)]
        median, _, _ = anchor.timed(lambda: encoder.encode(prompts), device, 1, 1 if dry else 5)
        run.emit(with_plan({"what": "klein-4b ours: text encode (PromptEncoder, cut at 27)", "batch": batch,
                            "captions_per_s": batch / median, **cuda_memory(device)},
                           predict_text(TextPlan("klein-4b", batch=16))))
    run.row("klein-4b ours text encode", 15, ours_text)

    def vae():
        anchor.vae_bench(device, 1 if dry else 4, 64 if dry else 1024, dry)
        rec = anchor.RESULTS[-1]
        run.emit(with_plan({**rec, "what": f"vae encode (recipe's), {rec['res']} px x {rec['batch']}"},
                           predict_latents(LatentPlan(1024, batch=4))))
    run.row("vae encode", 15, vae)


def torch_closure() -> set[str]:
    """torch and every distribution it requires (what a bare CUDA torch install already has)."""
    import importlib.metadata as md
    import re

    seen, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" not in req:
                todo.append(canonical(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
    return seen


def canonical(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions() -> list[str]:
    """`name==version` of every distribution this process imported beyond torch's own closure: what the GPU
    machine must be given (bench/gpu_requirements.txt lists them; a test checks the list covers these)."""
    import importlib.metadata as md

    owners = md.packages_distributions()
    base = torch_closure()
    names = set()
    for module in list(sys.modules):
        top = module.split(".")[0]
        for dist in owners.get(top, []):
            if canonical(dist) not in base and canonical(dist) != "flux2lora":
                names.add(canonical(dist))
    return sorted(f"{n}=={md.version(n)}" for n in names)


def markdown(run: Run) -> str:
    head = ("| row | step / encode s | recipe / ours | peak alloc GiB | reserved GiB | planned peak GiB | "
            "planned need GiB | planned / measured |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in run.rows:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['what']} | {r.get('skipped') or r.get('error')} | | | | | | |")
            continue
        if "planned_peak_gib" not in r:
            continue

        def num(key, fmt="{:.2f}"):
            return fmt.format(r[key]) if r.get(key) is not None else ""
        ratio = (f"{r['planned_peak_gib'] / r['peak_gib']:.2f}" if r.get("peak_gib") else "")
        lines.append(f"| {r['what']} | {num('step_s_median', '{:.3f}')} | {num('recipe_over_ours')} | "
                     f"{num('peak_gib', '{:.1f}')} | {num('reserved_gib', '{:.1f}')} | "
                     f"{num('planned_peak_gib', '{:.1f}')} | {num('planned_needs_gib', '{:.1f}')} | {ratio} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="CPU, reduced sizes: proves every row runs")
    ap.add_argument("--budget-s", type=float, default=255.0, help="stop starting rows after this many seconds")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    run = Run(args.dry_run, args.budget_s, Path(os.environ.get("OUT") or "/tmp/out"))
    anchor = train_step.load_anchor(train_step.ANCHOR)
    import diffusers
    import peft
    import transformers

    run.emit({"what": "versions", "torch": torch.__version__, "diffusers": diffusers.__version__,
              "peft": peft.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
              "dry_run": args.dry_run})
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    # The recipe calls gc.collect() around every row: with the imported libraries' objects frozen, a collection
    # scans only what the rows created (0.7 s -> milliseconds each on 2 cores; nothing importable is garbage)
    gc.freeze()
    run.row("machine", 10, machine, run, anchor, device)
    training_rows(run, anchor, device, "klein-4b", [])
    training_rows(run, anchor, device, "klein-9b", [])
    training_rows(run, anchor, device, "dev", [])
    mistral_rows(run, device)
    training_rows(run, anchor, device, "klein-4b", KLEIN_4B_MODES, recipe_too=False)
    training_rows(run, anchor, device, "klein-4b", COMPILE_MODES[:1], recipe_too=False)
    qwen_and_vae_rows(run, anchor, device)
    training_rows(run, anchor, device, "klein-4b", COMPILE_MODES[1:] + INT4_MODE, recipe_too=False)
    table = markdown(run)
    (run.out / "gpu_run.md").write_text(table)
    (run.out / "imported_distributions.txt").write_text("".join(f"{d}\n" for d in imported_distributions()))
    print("\n" + table + f"\n{len(run.rows)} rows in {time.perf_counter() - run.start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
