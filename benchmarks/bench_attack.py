"""k-PGD attack throughput on the albert-base-v2 shape (SPEC 7): examples per second per PGD step.

    .venv/bin/python benchmarks/bench_attack.py                   # CPU, or the GPU when there is one
    .venv/bin/python benchmarks/bench_attack.py --device cuda --repeats 5

Random weights with the real architecture (``random:<folder>``: config and tokenizer only, no download),
random token ids, every position real (no padding), gold labels drawn at random. One attack of k steps costs
k forward-backward passes plus two forward passes (clean and attacked); the figure divides examples x k by the
wall time of whole attacks, so it is what a Table 5 run sees per step. bf16 autocast on CUDA, as in
``carlrar attack``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from carlrar.adversary import Batch
from carlrar.attacks import pgd_attack
from carlrar.models import load_model

DEFAULT_MODEL = f"random:{Path(__file__).resolve().parents[2] / 'shared' / 'albert'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (default: random albert-base-v2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="tokens per example")
    parser.add_argument("--steps", type=int, default=10, help="k")
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=1, help="timed attacks (after one warm-up attack of 1 step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    model, _ = load_model(args.model, 2)
    model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (args.batch_size, args.length), generator=g)
    batch = Batch(
        ids, torch.ones_like(ids), torch.randint(0, 2, (args.batch_size,), generator=g), torch.arange(args.batch_size)
    ).to(device)

    def attack(steps: int) -> None:
        pgd_attack(model, batch, args.epsilon, steps, generator=torch.Generator().manual_seed(0), amp_dtype=amp_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    attack(1)  # warm-up: kernels, allocator, autotuning
    started = time.perf_counter()
    for _ in range(args.repeats):
        attack(args.steps)
    seconds = (time.perf_counter() - started) / args.repeats
    result = {
        "model": args.model,
        "device": str(device),
        "autocast": str(amp_dtype) if amp_dtype else None,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "length": args.length,
        "steps": args.steps,
        "seconds_per_attack": round(seconds, 3),
        "examples_per_second": round(args.batch_size / seconds, 2),
        "examples_per_second_per_step": round(args.batch_size * args.steps / seconds, 2),
    }
    print(
        f"k-PGD on {device}: {result['examples_per_second_per_step']} examples/s per PGD step "
        f"({result['examples_per_second']} examples/s for k = {args.steps}, {seconds:.2f} s per batch of "
        f"{args.batch_size} x {args.length})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
