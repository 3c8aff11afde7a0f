"""What makes the quick mode fit in 30 CPU minutes: fused AdamW and bf16 autocast, measured as ratios.

One MiniLM-L6 training step (forward-backward passes of ``adversarial_backward``, clipping 1.0, AdamW) on real
SST-2 and AG's News batches of 16, one thread (as the quick profile runs each job), for three set-ups run
round-robin on the same batches so that load changes hit all alike:

* ``fp32 + AdamW``  -- what the quick mode ran before (torch's default, per-parameter AdamW);
* ``fp32 + fused``  -- ``AdamW(fused=True)``, one kernel over all parameters (training.py's choice);
* ``bf16 + fused``  -- plus ``training.precision: bf16``, autocast on the CPU (what ``auto`` takes with native bf16).

Each for base and FreeLB (the dataset's Table 1 values). Prints median step times and the ratios; bf16 is fast
only on CPUs with native bf16 instructions (AVX512-BF16 or AMX), so the CPU's flags are printed too.

    .venv/bin/python benchmarks/bench_cpu_precision.py --raw-dir ../shared/data [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from carlrar.adversary import Batch, FreeLB, adversarial_backward
from carlrar.config import FreeLBConfig
from carlrar.hardware import CPUINFO, NATIVE_BF16_FLAGS, cpu_capability, cpu_flags, cpu_has_native_bf16
from carlrar.models import load_model

SETUPS = {"fp32 + AdamW": (None, False), "fp32 + fused": (None, True), "bf16 + fused": (torch.bfloat16, True)}
FREELB = {"sst2": FreeLBConfig(0.6, 0.1, 0.0, 2), "ag_news": FreeLBConfig(0.0, 0.01, 0.0, 3)}


def real_batches(raw_dir: Path, dataset: str, tokenizer, count: int, size: int = 16) -> list[Batch]:
    """``count`` batches of real sentences, dynamically padded to 64 tokens at most (config/quick.yaml)."""
    if dataset == "sst2":
        frame = pd.read_csv(raw_dir / "sst2/train.tsv", sep="\t", quoting=3)
        texts, labels = frame["sentence"].tolist(), frame["label"].tolist()
    else:
        frame = pd.read_csv(raw_dir / "ag_news/test.csv", header=None)
        texts, labels = (frame[1] + " " + frame[2]).tolist(), (frame[0] - 1).tolist()
    batches = []
    for start in range(0, count * size, size):
        enc = tokenizer(texts[start : start + size], truncation=True, max_length=64, padding=True, return_tensors="pt")
        rows = torch.arange(start, start + size)
        batches.append(Batch(enc["input_ids"], enc["attention_mask"], torch.tensor(labels[start : start + size]), rows))
    return batches


def step(model, params, optimizer, batch: Batch, freelb: FreeLB | None, amp: torch.dtype | None) -> float:
    started = time.perf_counter()
    adversarial_backward(model, batch, freelb, [], 0, amp)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def measure(raw_dir: Path, dataset: str, rounds: int) -> dict[tuple[str, str], float]:
    """Median step time per (method, set-up), round-robin over the set-ups on the same batches."""
    torch.manual_seed(0)
    model, tokenizer = load_model("minilm-l6", 2 if dataset == "sst2" else 4, pooling="mean")
    model.train()
    params = list(model.parameters())
    optimizers = {name: torch.optim.AdamW(params, lr=1e-7, fused=fused) for name, (_, fused) in SETUPS.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for index, batch in enumerate(real_batches(raw_dir, dataset, tokenizer, rounds + 1)):
        for method, freelb in (("base", None), ("freelb", FreeLB(FREELB[dataset]))):
            for name, (amp, _) in SETUPS.items():
                seconds = step(model, params, optimizers[name], batch, freelb, amp)
                if index > 0:  # the first round warms up allocators and kernels
                    times.setdefault((method, name), []).append(seconds)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-dir", type=Path, default=Path("../shared/data"), help="folder with sst2/, ag_news/")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per dataset (default: 6)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    flags = cpu_flags(CPUINFO.read_text()) if CPUINFO.exists() else set()
    native = sorted(flags & NATIVE_BF16_FLAGS)
    print(
        f"torch {torch.__version__}, 1 thread, CPU capability {cpu_capability()}, native bf16: "
        f"{', '.join(native) or 'none'} (training.precision auto takes {'bf16' if cpu_has_native_bf16() else 'fp32'})"
    )
    for dataset in ("sst2", "ag_news"):
        medians = measure(args.raw_dir, dataset, args.rounds)
        print(f"\n{dataset}, batch 16, {args.rounds} timed rounds: median step (s)")
        print("| method | " + " | ".join(SETUPS) + " | fused speed-up | bf16 speed-up | both |")
        print("|---|" + "---:|" * (len(SETUPS) + 3))
        for method in ("base", "freelb"):
            plain, fused, bf16 = (medians[(method, name)] for name in SETUPS)
            cells = " | ".join(f"{value:.3f}" for value in (plain, fused, bf16))
            print(f"| {method} | {cells} | {plain / fused:.2f} | {fused / bf16:.2f} | {plain / bf16:.2f} |")


if __name__ == "__main__":
    main()
