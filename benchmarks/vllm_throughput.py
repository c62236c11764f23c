"""Requests/s and time to first token of a vLLM engine with and without mrprune's plugin.

Each setting runs in a fresh process (one engine each): first ``--ttft-requests`` requests one at a time with one
output token (TTFT = wall time of that request: processing, encoder, pruning, prefill), then ``--requests`` requests
at once with ``--max-tokens`` greedy tokens (requests/s and output tokens/s over the batch's wall time). Every
request carries a different random image, so vLLM's encoder cache never serves one.

    python benchmarks/vllm_throughput.py --tiny llava_next                       # a tiny random LLaVA-NeXT
    python benchmarks/vllm_throughput.py --model llava-hf/llava-v1.6-mistral-7b-hf \\
        --prompt "[INST] <image>\\nDescribe the image. [/INST]" --image-size 672 672

Prints one JSON object per setting and writes them all to ``--out``; the device is recorded (``cpu`` or the GPU's
name): CPU numbers are CPU numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def _worker(args: argparse.Namespace, setting: dict | None) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from vllm import LLM, SamplingParams

    overrides = {"mrprune": setting} if setting else {}
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        max_model_len=args.max_model_len,
        seed=0,
        hf_overrides=overrides,
        limit_mm_per_prompt={"image": 1},
    )
    rng = np.random.default_rng(0)
    height, width = args.image_size

    def request() -> dict:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        return {"prompt": args.prompt, "multi_modal_data": {"image": Image.fromarray(pixels)}}

    llm.generate([request()], SamplingParams(max_tokens=1), use_tqdm=False)  # warm-up
    ttft = []
    for _ in range(args.ttft_requests):
        start = time.perf_counter()
        out = llm.generate([request()], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        ttft.append(time.perf_counter() - start)
    prompt_tokens = len(out[0].prompt_token_ids)
    batch = [request() for _ in range(args.requests)]
    start = time.perf_counter()
    outs = llm.generate(batch, SamplingParams(max_tokens=args.max_tokens, temperature=0.0), use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"
    return {
        "pruning": setting or "off",
        "model": args.model,
        "device": device,
        "prompt_tokens": prompt_tokens,
        "ttft_s_median": statistics.median(ttft),
        "requests": args.requests,
        "requests_per_s": args.requests / seconds,
        "output_tokens_per_s": generated / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model folder or hub name vLLM can load")
    source.add_argument("--tiny", choices=["llava", "llava_next"], help="build a tiny random model in a temp folder")
    parser.add_argument("--prompt", default="w5 <image> w6 w7 w8", help="the prompt text, with the image placeholder")
    parser.add_argument("--image-size", type=int, nargs=2, default=[112, 112], metavar=("H", "W"))
    parser.add_argument("--method", default="mr_pruner")
    parser.add_argument("--keep-ratio", type=float, nargs="+", default=[0.25])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--ttft-requests", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", default="vllm_throughput.json")
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # internal: run one setting in this process
    args = parser.parse_args()

    if args.setting is not None:
        print("RESULT " + json.dumps(_worker(args, json.loads(args.setting))), flush=True)
        return
    if args.tiny:
        from mrprune.integrations.vllm.testing import build_llava

        args.model = tempfile.mkdtemp(prefix="mrprune-vllm-bench-")
        build_llava(args.model, args.tiny == "llava_next", image_size=56, patch_size=7, hidden=256, layers=4)
    settings = [None] + [{"method": args.method, "keep_ratio": r} for r in args.keep_ratio]
    results = []
    for setting in settings:
        argv = [a for a in sys.argv[1:] if a != "--tiny" and a not in ("llava", "llava_next")]
        command = [sys.executable, __file__, *argv, "--model", args.model, "--setting", json.dumps(setting)]
        if args.tiny and "--enforce-eager" not in argv:
            command.append("--enforce-eager")
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"setting {setting} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        print(json.dumps(results[-1]), flush=True)
    with open(args.out, "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
