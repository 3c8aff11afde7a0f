"""Training-step cost of base, FreeLB, CARL (loss on, and in its bank-writing window) and RAR; memory of the passes
and of CARL's loss.

Measures, in one run:

1. Step time (all forward-backward passes + gradient clipping + the optimizer step) and samples/second of
   base, freelb, carl (L_D on, banks written), carl_bank (CARL before tau: banks written, no loss) and rar, in
   four cases: two FreeLB settings of Table 1 on two models.
   (a) ``albert``: the albert-base-v2 architecture with random weights (only its config is needed: ``--albert``),
       2 classes, batch 32 x 64 tokens, SST-2's FreeLB values (init_mag 0.6, adv_lr 0.1, K = 2), CARL with banks
       of 67,349 rows (SST-2's training set; random labels in SST-2's proportions), pre-filled, m = 16,000, RAR
       with w_r = 0.1;
   (b) ``albert_ag``: the same model with AG's News's values from ``config/config.yaml`` (init_mag 0, adv_lr 0.01,
       K = 3; Table 9's batch of 16), 4 classes, banks of 60,000 rows (15,000 per class), m = 16,000;
   (c) ``minilm``: MiniLM (``minilm-l6``, real weights) with real, dynamically padded SST-2 batches from
       ``$RAW_DIR/sst2/train.tsv`` (CARL's banks hold every training row, with the real labels);
   (d) ``minilm_ag``: MiniLM on real AG's News batches of 16 from ``$RAW_DIR/ag_news`` (train.csv, else
       train_partial.csv) with AG's News's values; the banks hold every row of that file with its label.
   Methods run round-robin (one step of each per round, the same batch) so that a change in machine load hits all
   alike; the figures are medians over the timed rounds, after warm-up, and the medians of the per-round ratios.
   At init_mag 0 FreeLB's first pass is CARL's clean view (carlrar.adversary.adversarial_backward), so carl costs
   little more than freelb; at init_mag > 0 the clean forward-backward is an extra pass.
2. Peak memory of each method's forward-backward passes per case (``step-memory``; ``adversarial_backward``
   alone), above what is allocated before them (weights, AdamW's states, banks): activations, the graphs kept for
   a later backward, the gradients.
3. The peak extra memory of L_D alone (forward + backward, banks excluded) as m grows, for two batch
   sizes: it should follow classes x m x dim (one [m, dim] gather per class and bank), not batch x m x dim.
   Memory is counted on CPU from the allocator's events (torch.profiler, profile_memory=True): every tensor
   allocation and free inside the call, in order, so the peak is exact; on CUDA it is
   torch.cuda.max_memory_allocated.

    python benchmarks/bench_steps.py                 # full run (about 15 minutes on 2 idle CPU cores)
    python benchmarks/bench_steps.py --quick         # a few minutes: small ALBERT batches, fewer rounds
    python benchmarks/bench_steps.py --skip albert,albert_ag,memory --minilm-rounds 20   # MiniLM cases only
    python benchmarks/bench_steps.py --json out.json # also write every figure as JSON
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from _common import SST2_POSITIVE, SST2_ROWS, prefilled_carl, sync, timed  # noqa: E402  (benchmarks/_common.py)
from torch import Tensor, nn  # noqa: E402

from carlrar.adversary import AuxiliaryLoss, Batch, FreeLB, adversarial_backward  # noqa: E402
from carlrar.config import FreeLBConfig, load_config  # noqa: E402
from carlrar.contrastive import CARLLoss, CARLObjective  # noqa: E402
from carlrar.data import DATASETS, read_file  # noqa: E402
from carlrar.models import TextClassifier, load_model  # noqa: E402
from carlrar.reconstruction import RARObjective, build_reconstructor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("base", "freelb", "carl", "carl_bank", "rar")
RATIOS = (("freelb", "base"), ("carl", "freelb"), ("carl_bank", "freelb"), ("rar", "freelb"))
CASES = ("albert", "albert_ag", "minilm", "minilm_ag")
PARTS = (*CASES, "step-memory", "memory")
BANK_WINDOW_TAU = 10**9  # carl_bank: tau never reached, the banks written every step (the epoch before tau)
MiB = 2**20
RUNTIME_NOTE = (
    "Runtime on an idle 2-core CPU: about 15 minutes by default (ALBERT at batch 32 x 64 costs about 8 s per "
    "forward+backward there; 18 minutes at --threads 1 --albert-rounds 3), a few minutes with --quick; on a shared, "
    "loaded machine two to four times more, and the timings are then unreliable (--threads 1 is steadier there). "
    "Per-step times go to stderr as they are measured."
)


# --- command line ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=RUNTIME_NOTE,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument(
        "--albert",
        default=str(ROOT.parent / "shared" / "albert"),
        help="folder with albert-base-v2's config.json and tokenizer (weights are random)",
    )
    p.add_argument(
        "--raw-dir",
        default=os.environ.get("RAW_DIR", str(ROOT.parent / "shared" / "data")),
        help="folder holding sst2/train.tsv (default: $RAW_DIR or ../shared/data)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=ROOT / "config" / "config.yaml",
        help="where the AG's News cases take FreeLB's values, the batch size, m and the bank size from",
    )
    p.add_argument("--batch-size", type=int, default=32, help="batch of the SST-2 cases")
    p.add_argument("--ag-batch-size", type=int, default=None, help="batch of the AG's News cases (default: config's)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per example in the ALBERT cases")
    p.add_argument("--adv-steps", type=int, default=2, help="FreeLB K of the SST-2 cases (SST-2: 2)")
    p.add_argument("--init-mag", type=float, default=0.6, help="of the SST-2 cases")
    p.add_argument("--adv-lr", type=float, default=0.1, help="of the SST-2 cases")
    p.add_argument("--bank-rows", type=int, default=SST2_ROWS, help="rows of the ALBERT SST-2 case's memory banks")
    p.add_argument("--negatives", type=int, default=16_000, help="CARL's m in the SST-2 cases")
    p.add_argument("--rar-weight", type=float, default=0.1)
    p.add_argument("--albert-rounds", type=int, default=2, help="timed rounds (one step per method) for ALBERT")
    p.add_argument(
        "--albert-warmup",
        type=int,
        default=0,
        help="full-size warm-up rounds for ALBERT (a short-batch warm-up step always runs)",
    )
    p.add_argument("--minilm-rounds", type=int, default=10, help="timed rounds for MiniLM")
    p.add_argument("--minilm-warmup", type=int, default=2)
    p.add_argument("--mem-m", default="1000,2000,4000,8000,16000", help="m values of the memory sweep")
    p.add_argument("--mem-batches", default="8,32", help="batch sizes of the memory sweep")
    p.add_argument(
        "--mem-classes", default="2,4", help="class counts of the memory sweep (the extra ones at the largest m only)"
    )
    p.add_argument("--mem-dim", type=int, default=768, help="representation size in the memory sweep (ALBERT: 768)")
    p.add_argument("--skip", default="", help=f"comma list of parts to skip: {', '.join(PARTS)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of the methods to run")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes on 2 idle CPU cores: ALBERT batches of 8 x 16 tokens, 1 timed round, 3 MiniLM "
        "rounds, m in 1000,4000,16000",
    )
    p.add_argument(
        "--amp",
        choices=["auto", "bf16", "off"],
        default="auto",
        help="bf16 autocast (auto: on for CUDA, as in training; never on CPU)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write all figures to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice, one per core); 1 is steadier on a loaded machine",
    )
    args = p.parse_args(argv)
    ag = load_config(args.config).dataset("ag_news")
    args.ag_freelb, args.ag_negatives = ag.freelb, ag.carl.negatives
    args.ag_rows = 4 * int(ag.per_class["train"])  # the paper's AG's News training set: 15,000 per class
    args.ag_batch_size = args.ag_batch_size or ag.batch_size
    if args.quick:
        args.batch_size, args.seq_len = min(args.batch_size, 8), min(args.seq_len, 16)
        args.ag_batch_size = min(args.ag_batch_size, 8)
        args.albert_rounds, args.albert_warmup, args.minilm_rounds, args.minilm_warmup = 1, 0, 3, 1
        args.mem_m = "1000,4000,16000"
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.methods = [m for m in METHODS if m in {s.strip() for s in args.methods.split(",")}]
    if not args.methods:
        p.error(f"--methods: choose among {', '.join(METHODS)}")
    if args.skip - set(PARTS):
        p.error(f"--skip: unknown part(s) {', '.join(sorted(args.skip - set(PARTS)))}; parts are {', '.join(PARTS)}")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {name}: CUDA is not available here")
    return device


# --- methods and one training step -------------------------------------------------------------------------------


class Method:
    def __init__(
        self, name: str, freelb: FreeLB | None, auxiliaries: list[AuxiliaryLoss], model: TextClassifier
    ) -> None:
        self.name, self.freelb, self.auxiliaries = name, freelb, auxiliaries
        seen: dict[int, nn.Parameter] = {}
        for module in [model, *[a for a in auxiliaries if isinstance(a, nn.Module)]]:
            for p in module.parameters():
                seen.setdefault(id(p), p)
        self.params = list(seen.values())
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)


def build_methods(
    model: TextClassifier,
    model_name: str,
    labels: Tensor,
    freelb_config: FreeLBConfig,
    negatives: int,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Method]:
    freelb = FreeLB(freelb_config)
    contrast = prefilled_carl(labels, model.config.hidden_size, negatives, device, args.seed)
    carl = CARLObjective(contrast, start_step=0, bank_start_step=0)  # loss on, banks written every step
    carl_bank = CARLObjective(contrast, start_step=BANK_WINDOW_TAU, bank_start_step=0)  # banks only (before tau)
    logging.getLogger("carlrar.reconstruction").setLevel(logging.ERROR)  # MiniLM has no pretrained MLM head
    rar = RARObjective(build_reconstructor(model, model_name), weight=args.rar_weight).to(device)
    methods = {
        "base": lambda: Method("base", None, [], model),
        "freelb": lambda: Method("freelb", freelb, [], model),
        "carl": lambda: Method("carl", freelb, [carl], model),
        "carl_bank": lambda: Method("carl_bank", freelb, [carl_bank], model),
        "rar": lambda: Method("rar", freelb, [rar], model),
    }
    return {name: methods[name]() for name in args.methods}


def train_step(model: TextClassifier, method: Method, batch: Batch, amp: torch.dtype | None, step: int = 1) -> dict:
    out = adversarial_backward(model, batch, method.freelb, method.auxiliaries, step=step, amp_dtype=amp)
    torch.nn.utils.clip_grad_norm_(method.params, 1.0)
    method.optimizer.step()
    method.optimizer.zero_grad(set_to_none=True)
    return out.losses


def time_methods(
    model: TextClassifier,
    methods: dict[str, Method],
    next_batch: Callable[[], Batch],
    warm_batch: Batch | None,
    warmup: int,
    rounds: int,
    device: torch.device,
    amp: torch.dtype | None,
    label: str,
) -> dict[str, dict[str, Any]]:
    """Round-robin: every round runs one step of each method on the same batch; medians over timed rounds."""
    model.train()
    if warm_batch is not None:  # allocates optimizer states and warms the kernels at little cost
        for method in methods.values():
            train_step(model, method, warm_batch.to(device), amp)
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu_times: dict[str, list[float]] = {name: [] for name in methods}
    tokens: list[int] = []
    losses: dict[str, dict] = {}
    batch_size = 0
    for r in range(warmup + rounds):
        batch = next_batch().to(device)
        batch_size = len(batch.labels)
        for name, method in methods.items():
            losses[name], timing = timed(functools.partial(train_step, model, method, batch, amp), device)
            elapsed, elapsed_cpu = timing.wall_s, timing.cpu_s
            if r >= warmup:
                times[name].append(elapsed)
                cpu_times[name].append(elapsed_cpu)
            print(
                f"  [{label}] round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''} "
                f"{name}: {elapsed:.2f} s (process CPU {elapsed_cpu:.2f} s)",
                file=sys.stderr,
                flush=True,
            )
        if r >= warmup:
            tokens.append(int(batch.attention_mask.sum()))
    assert "carl" not in methods or "carl" in losses["carl"], "CARL's loss was not active"
    assert "carl_bank" not in methods or "carl" not in losses["carl_bank"], "CARL's loss was on in its bank window"
    round_ratios = {
        f"{a}/{b}": statistics.median(x / y for x, y in zip(times[a], times[b]))
        for a, b in RATIOS
        if a in times and b in times
    }
    return {
        name: {
            "step_s": statistics.median(ts),
            "steps_timed": len(ts),
            "all_step_s": ts,
            "min_step_s": min(ts),
            "cpu_s": statistics.median(cpu_times[name]),
            "all_cpu_s": cpu_times[name],
            "samples_per_s": batch_size / statistics.median(ts),
            "losses": losses[name],
        }
        for name, ts in times.items()
    } | {"_tokens_per_batch": statistics.mean(tokens) if tokens else None, "_round_ratios": round_ratios}


def step_memory(
    model: TextClassifier, methods: dict[str, Method], batch: Batch, device: torch.device, amp: torch.dtype | None
) -> dict[str, float]:
    """Peak MiB of each method's forward-backward passes (``adversarial_backward``, gradients zeroed to None before
    it) above what is allocated before them: activations, the graphs kept for a later backward, the gradients.
    Clipping and the optimizer step, the same for every method, run after the measurement."""
    peaks = {}
    for name, method in methods.items():
        call = functools.partial(adversarial_backward, model, batch, method.freelb, method.auxiliaries, 1, amp)
        peaks[name] = peak_extra_bytes(call, device) / MiB
        torch.nn.utils.clip_grad_norm_(method.params, 1.0)
        method.optimizer.step()
        method.optimizer.zero_grad(set_to_none=True)
        print(f"  [step memory] {name}: {peaks[name]:.1f} MiB", file=sys.stderr, flush=True)
    return peaks


def ratios(results: dict[str, dict], key: str = "step_s") -> dict[str, float]:
    """Step-time ratios (= inverse ratios of samples/second); key "cpu_s" for process-CPU-time ratios."""
    return {f"{a}/{b}": results[a][key] / results[b][key] for a, b in RATIOS if a in results and b in results}


def time_carl_loss_alone(loss: CARLLoss, labels: Tensor, batch_size: int, device: torch.device, reps: int = 5) -> float:
    """Median seconds of L_D's forward + backward on live [batch, dim] views (bank gather, products, NCE)."""
    generator = torch.Generator().manual_seed(1)
    times = []
    for _ in range(reps + 1):
        rows = torch.randperm(labels.numel(), generator=generator)[:batch_size]
        clean = torch.randn(batch_size, loss.bank_orig.rows.shape[1], device=device, requires_grad=True)
        adv = torch.randn(batch_size, loss.bank_orig.rows.shape[1], device=device, requires_grad=True)
        sync(device)
        start = time.perf_counter()
        loss(rows.to(device), labels[rows].to(device), clean, adv).backward()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


# --- (a, b) albert-base-v2 shape, random weights ---------------------------------------------------------------


def sst2_freelb(args: argparse.Namespace) -> FreeLBConfig:
    return FreeLBConfig(
        init_mag=args.init_mag, adv_lr=args.adv_lr, adv_max_norm=0.0, adv_steps=args.adv_steps, norm_type="l2"
    )


def run_case(
    label: str,
    model: TextClassifier,
    methods: dict[str, Method],
    next_batch: Callable[[], Batch],
    warm_batch: Batch,
    warmup: int,
    rounds: int,
    labels: Tensor,
    batch_size: int,
    args: argparse.Namespace,
    device: torch.device,
    amp: torch.dtype | None,
) -> dict[str, Any]:
    """Timed rounds, then L_D alone, then (unless skipped) one step per method for its peak memory."""
    results = time_methods(model, methods, next_batch, warm_batch, warmup, rounds, device, amp, label)
    contrast = next((m.auxiliaries[0].contrast for m in methods.values() if m.name.startswith("carl")), None)
    if contrast is not None:
        results["_carl_loss_alone_s"] = time_carl_loss_alone(contrast, labels, batch_size, device)
    if "step-memory" not in args.skip:
        results["_peak_step_mib"] = step_memory(model, methods, next_batch().to(device), device, amp)
    return results


def albert_case(
    args: argparse.Namespace, device: torch.device, amp: torch.dtype | None, ag: bool = False
) -> dict[str, Any]:
    name = f"random:{args.albert}"
    torch.manual_seed(args.seed)
    num_labels = 4 if ag else 2
    model, _ = load_model(name, num_labels)
    model.to(device)
    generator = torch.Generator().manual_seed(args.seed)
    rows = args.ag_rows if ag else args.bank_rows
    if ag:  # AG's News: 4 balanced classes
        labels = torch.arange(rows) % 4
    else:
        labels = (torch.rand(rows, generator=generator) < SST2_POSITIVE).long()
    freelb = args.ag_freelb if ag else sst2_freelb(args)
    negatives = args.ag_negatives if ag else args.negatives
    batch_size = args.ag_batch_size if ag else args.batch_size
    methods = build_methods(model, name, labels, freelb, negatives, args, device)
    vocab = model.config.vocab_size

    def make_batch(size: int, seq_len: int) -> Batch:
        picked = torch.randperm(rows, generator=generator)[:size]
        ids = torch.randint(5, vocab, (size, seq_len), generator=generator)
        ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
        return Batch(ids, torch.ones_like(ids), labels[picked], picked)

    return run_case(
        "albert_ag" if ag else "albert",
        model,
        methods,
        lambda: make_batch(batch_size, args.seq_len),
        make_batch(2, 8),
        args.albert_warmup,
        args.albert_rounds,
        labels,
        batch_size,
        args,
        device,
        amp,
    )


# --- (c, d) MiniLM, real SST-2 and AG's News batches --------------------------------------------------------------


def read_train(raw_dir: Path, dataset: str) -> tuple[list[str], Tensor]:
    """A raw training file read by carlrar.data (any of its formats): texts and 0-based labels."""
    names = ["train.tsv"] if dataset == "sst2" else ["train.csv", "train_partial.csv"]
    path = next((raw_dir / dataset / n for n in names if (raw_dir / dataset / n).is_file()), None)
    if path is None:
        sys.exit(
            f"{raw_dir / dataset} holds none of {', '.join(names)}: pass --raw-dir (or set RAW_DIR) to the folder "
            f"holding {dataset}/, or skip its case (--skip)"
        )
    split = read_file(path, DATASETS[dataset])
    return split.texts, torch.tensor(split.labels)


def minilm_case(
    args: argparse.Namespace, device: torch.device, amp: torch.dtype | None, ag: bool = False
) -> dict[str, Any]:
    texts, labels = read_train(Path(args.raw_dir), "ag_news" if ag else "sst2")
    torch.manual_seed(args.seed)
    model, tokenizer = load_model("minilm-l6", int(labels.max()) + 1)
    model.to(device)
    freelb = args.ag_freelb if ag else sst2_freelb(args)
    negatives = args.ag_negatives if ag else args.negatives
    batch_size = args.ag_batch_size if ag else args.batch_size
    methods = build_methods(model, "minilm-l6", labels, freelb, negatives, args, device)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed))
    position = [0]
    pad_id = tokenizer.pad_token_id or 0

    def make_batch(size: int) -> Batch:
        rows = order[position[0] : position[0] + size]
        position[0] += size
        enc = tokenizer([texts[i] for i in rows.tolist()], truncation=True, max_length=128)["input_ids"]
        width = max(len(e) for e in enc)  # dynamic padding (SPEC 3 step 1)
        ids = torch.full((len(enc), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
        return Batch(ids, mask, labels[rows], rows)

    results = run_case(
        "minilm_ag" if ag else "minilm",
        model,
        methods,
        lambda: make_batch(batch_size),
        make_batch(2),
        args.minilm_warmup,
        args.minilm_rounds,
        labels,
        batch_size,
        args,
        device,
        amp,
    )
    return results | {"_bank_rows": len(texts)}


# --- memory of L_D ------------------------------------------------------------------------------------------------


def peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated when it started."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(events: list) -> Any:
        for event in events:
            yield event
            yield from walk(event.children)

    allocations = sorted(
        (e for e in walk(prof.profiler.kineto_results.experimental_event_tree()) if e.tag == _EventType.Allocation),
        key=lambda e: e.start_time_ns,
    )
    current = peak = 0
    for event in allocations:  # every allocation (+) and free (-), in order
        current += event.extra_fields.alloc_size
        peak = max(peak, current)
    return peak


def loss_backward(loss: CARLLoss, indices: Tensor, labels: Tensor, clean: Tensor, adv: Tensor) -> None:
    loss(indices, labels, clean, adv).backward()


def memory_sweep(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    ms = [int(m) for m in args.mem_m.split(",")]
    batch_sizes = [int(b) for b in args.mem_batches.split(",")]
    class_counts = [int(c) for c in args.mem_classes.split(",")]
    dim, rows = args.mem_dim, SST2_ROWS
    out = []
    for classes in class_counts:
        generator = torch.Generator().manual_seed(args.seed)
        labels = torch.randint(0, classes, (rows,), generator=generator)
        banks = prefilled_carl(labels, dim, max(ms), device, args.seed)
        for m in ms if classes == class_counts[0] else [max(ms)]:
            loss = CARLLoss(labels, dim, m, seed=args.seed).to(device)
            loss.bank_orig, loss.bank_adv = banks.bank_orig, banks.bank_adv  # share the filled banks
            for batch_size in batch_sizes:
                # every class present in the batch, as in a real batch of this size
                per_class = [(labels == c).nonzero().squeeze(1)[: batch_size // classes] for c in range(classes)]
                batch_rows = torch.cat(per_class)
                fill = torch.randperm(rows, generator=generator)[: batch_size - len(batch_rows)]
                batch_rows = torch.cat([batch_rows, fill])
                clean = torch.randn(batch_size, dim, device=device, requires_grad=True)
                adv = torch.randn(batch_size, dim, device=device, requires_grad=True)
                idx, lab = batch_rows.to(device), labels[batch_rows].to(device)
                call = functools.partial(loss_backward, loss, idx, lab, clean, adv)
                call()  # sets Z; the measured call is a steady-state one
                clean.grad = adv.grad = None
                sync(device)
                start = time.perf_counter()
                peak = peak_extra_bytes(call, device)
                elapsed = time.perf_counter() - start
                clean.grad = adv.grad = None
                present = int(lab.unique().numel())
                out.append(
                    {
                        "classes": classes,
                        "m": m,
                        "batch": batch_size,
                        "dim": dim,
                        "peak_extra_mib": peak / MiB,
                        "classes_m_dim_2banks_mib": 2 * present * m * dim * 4 / MiB,
                        "batch_m_dim_2banks_mib": 2 * batch_size * m * dim * 4 / MiB,
                        "seconds_incl_profiler": elapsed,
                    }
                )
                print(
                    f"  [memory] classes {classes} m {m} batch {batch_size}: {peak / MiB:.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
            del loss
        del banks
    return out


# --- report -------------------------------------------------------------------------------------------------------


def step_table(title: str, results: dict[str, Any]) -> str:
    peaks = results.get("_peak_step_mib")
    lines = [
        f"{title}",
        f"{'method':<9} {'median step (s)':>15} {'samples/s':>10} {'fastest step (s)':>16} {'CPU (s)':>8} "
        f"{'peak MiB':>9}  losses",
    ]
    for name in [m for m in METHODS if m in results]:
        r = results[name]
        losses = ", ".join(f"{k} {v:.3f}" for k, v in r["losses"].items())
        peak = f"{peaks[name]:>9.1f}" if peaks else f"{'-':>9}"
        lines.append(
            f"{name:<9} {r['step_s']:>15.3f} {r['samples_per_s']:>10.2f} {r['min_step_s']:>16.3f} "
            f"{r['cpu_s']:>8.2f} {peak}  {losses}"
        )
    for title_, key in (("median wall", "step_s"), ("fastest wall", "min_step_s"), ("median CPU", "cpu_s")):
        lines.append(
            f"step-time ratios, {title_ + ':':<19} "
            + ", ".join(f"{k} {v:.3f}" for k, v in ratios(results, key).items())
        )
    lines.append(
        f"step-time ratios, {'median of rounds:':<19} "
        + ", ".join(f"{k} {v:.3f}" for k, v in results["_round_ratios"].items())
    )
    if "_carl_loss_alone_s" in results and "freelb" in results:
        lines.append(
            f"L_D alone (forward+backward, m negatives): {results['_carl_loss_alone_s'] * 1000:.1f} ms "
            f"= {results['_carl_loss_alone_s'] / results['freelb']['step_s'] * 100:.2f}% of a freelb step"
        )
    return "\n".join(lines)


def memory_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "Peak extra memory of L_D (forward+backward; banks excluded), MiB",
        f"{'classes':>7} {'m':>6} {'batch':>5} {'measured':>9} {'2*C*m*dim*4B':>13} {'2*B*m*dim*4B':>13}",
    ]
    for r in rows:
        lines.append(
            f"{r['classes']:>7} {r['m']:>6} {r['batch']:>5} {r['peak_extra_mib']:>9.1f} "
            f"{r['classes_m_dim_2banks_mib']:>13.1f} {r['batch_m_dim_2banks_mib']:>13.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()  # MiniLM's missing MLM head is expected here
    transformers.utils.logging.disable_progress_bar()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = torch.bfloat16 if (args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")) else None
    if amp is not None and device.type != "cuda":
        amp = None  # autocast is CUDA-only in training (carlrar.adversary.autocast_context)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": {
            "device": str(device),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "args": {
            k: (sorted(v) if isinstance(v, set) else v if isinstance(v, int | float | str | bool | None) else str(v))
            for k, v in vars(args).items()
        },
        "amp": str(amp),
    }
    sections = []
    sst2 = f"init_mag {args.init_mag}, adv_lr {args.adv_lr}, K={args.adv_steps}"
    fl = args.ag_freelb
    ag = f"AG's News values: init_mag {fl.init_mag}, adv_lr {fl.adv_lr}, K={fl.adv_steps}"
    cases = {
        "albert": (
            lambda: albert_case(args, device, amp),
            lambda res: (
                f"(a) albert-base-v2 shape, random weights: batch {args.batch_size} x {args.seq_len} tokens, "
                f"{sst2}, banks {args.bank_rows} rows, m={args.negatives}, {args.albert_rounds} timed rounds"
            ),
        ),
        "albert_ag": (
            lambda: albert_case(args, device, amp, ag=True),
            lambda res: (
                f"(b) albert-base-v2 shape, random weights: batch {args.ag_batch_size} x {args.seq_len} "
                f"tokens, {ag}, 4 classes, banks {args.ag_rows} rows, m={args.ag_negatives}, "
                f"{args.albert_rounds} timed rounds"
            ),
        ),
        "minilm": (
            lambda: minilm_case(args, device, amp),
            lambda res: (
                f"(c) minilm-l6 (real weights), real SST-2 batches of {args.batch_size} "
                f"(mean {res['_tokens_per_batch']:.0f} real tokens/batch), {sst2}, banks {res['_bank_rows']} rows, "
                f"m={args.negatives}, {args.minilm_rounds} timed rounds"
            ),
        ),
        "minilm_ag": (
            lambda: minilm_case(args, device, amp, ag=True),
            lambda res: (
                f"(d) minilm-l6 (real weights), real AG's News batches of {args.ag_batch_size} "
                f"(mean {res['_tokens_per_batch']:.0f} real tokens/batch), {ag}, banks {res['_bank_rows']} rows, "
                f"m={args.ag_negatives}, {args.minilm_rounds} timed rounds"
            ),
        ),
    }
    for key, (run, title) in cases.items():
        if key in args.skip:
            continue
        res = run()
        report[key] = {**res, "ratios": ratios(res), "cpu_ratios": ratios(res, "cpu_s")}
        sections.append(step_table(title(res), res))
    if "memory" not in args.skip:
        rows = memory_sweep(args, device)
        report["memory"] = rows
        sections.append(memory_table(rows))
    report["total_seconds"] = time.perf_counter() - started
    m = report["machine"]
    where = m["gpu"] or f"{m['cpu_count']} CPUs, {m['torch_threads']} torch threads"
    print(
        f"\ndevice {m['device']} ({where}), torch {m['torch']}, amp {report['amp']}, "
        f"total {report['total_seconds']:.0f} s\n"
    )
    print("\n\n".join(sections))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
