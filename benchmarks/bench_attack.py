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
from typing import Any

import torch
from _common import sync

from carlrar.adversary import Batch
from carlrar.attacks import pgd_attack
from carlrar.models import TextClassifier, load_model

DEFAULT_MODEL = f"random:{Path(__file__).resolve().parents[2] / 'shared' / 'albert'}"


def random_batch(vocab_size: int, batch_size: int, length: int, num_labels: int = 2, seed: int = 0) -> Batch:
    """Random token ids, every position real (no padding), random gold labels: a batch of full length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch_size, length), generator=g)
    labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    return Batch(ids, torch.ones_like(ids), labels, torch.arange(batch_size))


def attack_throughput(
    model: TextClassifier,
    batch: Batch,
    epsilon: float,
    steps: int,
    repeats: int,
    amp_dtype: torch.dtype | None,
    step_size: float | None = None,
) -> dict[str, Any]:
    """Seconds per whole k-step attack on ``batch`` (on the model's device) and examples/s, after a 1-step warm-up.

    Whole attacks are timed, not single PGD steps, so the two extra forward passes (clean, attacked) are in the cost
    as a Table 5 run pays them; examples/s per step is examples x k over that time.
    """
    device = batch.input_ids.device

    def attack(k: int) -> None:
        generator = torch.Generator().manual_seed(0)
        pgd_attack(model, batch, epsilon, k, step_size, generator=generator, amp_dtype=amp_dtype)
        sync(device)

    attack(1)  # warm-up: kernels, allocator, autotuning
    started = time.perf_counter()
    for _ in range(repeats):
        attack(steps)
    seconds = (time.perf_counter() - started) / repeats
    size = len(batch.labels)
    return {
        "seconds_per_attack": seconds,
        "examples_per_second": size / seconds,
        "examples_per_second_per_step": size * steps / seconds,
    }


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
    batch = random_batch(model.config.vocab_size, args.batch_size, args.length).to(device)
    measured = attack_throughput(model, batch, args.epsilon, args.steps, args.repeats, amp_dtype)
    seconds = measured["seconds_per_attack"]
    result = {
        "model": args.model,
        "device": str(device),
        "autocast": str(amp_dtype) if amp_dtype else None,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "length": args.length,
        "steps": args.steps,
        "seconds_per_attack": round(seconds, 3),
        "examples_per_second": round(measured["examples_per_second"], 2),
        "examples_per_second_per_step": round(measured["examples_per_second_per_step"], 2),
    }
    print(
        f"k-PGD on {device}: {result['examples_per_second_per_step']} examples/s per PGD step "
        f"({result['examples_per_second']} examples/s for k = {args.steps}, {seconds:.2f} s per "
        f"batch of {args.batch_size} x {args.length})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
