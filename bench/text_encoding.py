"""Text-embedding caching: the pipelines' way (whole causal LM, all hidden states) beside ours (PromptEncoder: the
base model cut after the deepest stacked layer, hidden states read by hooks), in one run, as captions/s and memory.

    python bench/text_encoding.py              # CPU: a mid-size random Qwen3 (12 layers, stacked 3/6/9)
    python bench/text_encoding.py --real       # GPU: Qwen3-4B (klein-4b's encoder) at real size, batch 16, bf16

Weights are random (speed and memory do not depend on their values); nothing is downloaded. Each variant runs in
its own subprocess so that its peak memory is its own (GPU: torch's max allocated; CPU: peak RSS of the process
beyond the same process's RSS after imports). Prints one JSON line per variant and a ratio line last.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=40960)
MID_SIZE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_variant(variant: str, real: bool, batch: int, iters: int, tokenizer_dir: str) -> dict:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    from flux2lora.text_encoding import PromptEncoder

    device = torch.device("cuda" if real else "cpu")
    dtype = torch.bfloat16 if real else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = QWEN3_4B if real else MID_SIZE
    layers = (9, 18, 27) if real else (3, 6, 9)
    prompts = [f"sks style, photo number {i} of a red circle on a blue background, studio light" for i in range(batch)]
    base_rss = _rss_mib()
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        if variant == "pipeline-full":
            config = Qwen3Config(vocab_size=151936 if real else len(tokenizer), **shape)
            model = Qwen3ForCausalLM(config).eval()
        else:
            config = Qwen3Config(vocab_size=151936 if real else len(tokenizer), **{**shape, "num_hidden_layers": max(layers)})
            model = Qwen3Model(config).eval()
    torch.set_default_dtype(prev)
    model.requires_grad_(False)

    if variant == "pipeline-full":
        from diffusers import Flux2KleinPipeline

        def encode():
            with torch.inference_mode():
                return Flux2KleinPipeline._get_qwen3_prompt_embeds(model, tokenizer, prompts, device=device,
                                                                   max_sequence_length=512,
                                                                   hidden_states_layers=layers)
    else:
        encoder = PromptEncoder(tokenizer, model, "qwen3", layers, 512, device)
        encode = lambda: encoder.encode(prompts)  # noqa: E731

    out = encode()  # warm-up
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        encode()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss) / 1024)
    return {"variant": variant, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "layers_run": len(getattr(model, "model", model).layers), "batch": batch, "tokens": 512,
            "captions_per_s": batch / med, "step_s_median": med, "peak_gib": peak,
            "param_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
            "out_shape": list(out.shape), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="Qwen3-4B on the GPU (needs CUDA)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batch = args.batch or (16 if args.real else 4)
    if args.variant:  # child process: one variant
        print(json.dumps(run_variant(args.variant, args.real, batch, args.iters, args.tokenizer)), flush=True)
        return

    from flux2lora.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        # the tiny model's offline-built Qwen tokenizer and chat template: the prompt formatting is the real one
        tokenizer_dir = str(make_tiny_model(Path(tmp) / "tiny", "klein-4b") / "tokenizer")
        results = {}
        for variant in ("pipeline-full", "flux2lora-truncated"):
            cmd = [sys.executable, __file__, "--variant", variant, "--tokenizer", tokenizer_dir,
                   "--batch", str(batch), "--iters", str(args.iters)] + (["--real"] if args.real else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{variant} failed")
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(results[variant]), flush=True)
    full, ours = results["pipeline-full"], results["flux2lora-truncated"]
    print(f"\nRATIO truncated/full: speed x{ours['captions_per_s'] / full['captions_per_s']:.2f}, "
          f"peak memory {ours['peak_gib'] / full['peak_gib']:.2f}, weights {ours['param_gib'] / full['param_gib']:.2f} "
          f"({'real Qwen3-4B' if args.real else 'mid-size Qwen3'}, batch {batch}, 512 tokens)")


if __name__ == "__main__":
    main()
