"""Training-step cost of base, FreeLB, CARL (loss on, and in its bank-writing window) and RAR; memory of the passes
and of CARL's loss.

One run measures, for each case (model x dataset), every method's training step (all forward-backward passes of
carlrar.adversary.adversarial_backward, clipping, the AdamW step), built as ``carlrar train`` builds it
(carlrar.methods.build_method) at the dataset's Table 1/9 values in ``--config``:

    albert     albert-base-v2's architecture, random weights, SST-2 (batch 32 x 64 tokens, K = 2, init_mag 0.6)
    albert_ag  the same model, AG's News (batch 16 x 128 tokens, K = 3, init_mag 0)
    minilm     MiniLM-L6 (real weights), real SST-2 training batches, dynamically padded
    minilm_ag  MiniLM-L6, real AG's News training batches

carl has L_D on and its banks written; carl_bank is CARL before tau (banks written, no loss); CARL's banks hold a
row per training example (random rows, as after the bank-writing epoch), m from the config. Methods run round-robin
(one step of each per round, on the same batch) so that a change of machine load hits all alike: the figures are
medians over the timed rounds, and the medians of the per-round ratios. At init_mag 0 FreeLB's first pass is CARL's
clean view, so carl costs little more than freelb; at init_mag > 0 the clean forward-backward is an extra pass.

``step-memory``: peak memory of each method's passes above what is allocated before them (weights, AdamW's states,
banks). ``memory``: peak extra memory of L_D alone as m grows, which should follow classes x m x dim, not batch x m x
dim. On CPU memory is counted exactly from the allocator's events (torch.profiler), on CUDA by max_memory_allocated.

    python benchmarks/bench_steps.py                      # every part (about 20 minutes on 2 idle CPU cores)
    python benchmarks/bench_steps.py --quick              # a few minutes: short ALBERT batches, few rounds
    python benchmarks/bench_steps.py --parts minilm_ag --methods freelb,carl,carl_bank --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from _common import (  # noqa: E402  (benchmarks/_common.py)
    ROOT,
    MiB,
    ModelSpec,
    Shape,
    Trainer,
    albert_spec,
    build_trainer,
    dataset_shape,
    machine_info,
    markdown_table,
    minilm_spec,
    prefilled_carl,
    quiet,
    step_batch,
    sync,
    timed,
    train_step,
)
from torch import Tensor  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from carlrar.adversary import Batch, adversarial_backward  # noqa: E402
from carlrar.config import Config, load_config  # noqa: E402
from carlrar.contrastive import CARLLoss, CARLObjective  # noqa: E402
from carlrar.data import DATASETS, read_file  # noqa: E402
from carlrar.errors import CarlrarError  # noqa: E402
from carlrar.host_memory import keep_host_memory  # noqa: E402
from carlrar.models import resolve_source  # noqa: E402
from carlrar.storage import check_output_file, write_json  # noqa: E402

METHODS = ("base", "freelb", "carl", "carl_bank", "rar")
RATIOS = (("freelb", "base"), ("carl", "freelb"), ("carl_bank", "freelb"), ("rar", "freelb"))
CASES = {"albert": ("albert", "sst2"), "albert_ag": ("albert", "ag_news"), "minilm": ("minilm", "sst2")}
CASES |= {"minilm_ag": ("minilm", "ag_news")}
PARTS = (*CASES, "step-memory", "memory")
ALBERT_LENGTHS = {"sst2": 64, "ag_news": 128}  # tokens per example: SST-2's sentences are short
BANK_WINDOW = 10**9  # carl_bank's tau: never reached, so the banks are written and L_D never runs
SWEEP = {"m": (1000, 2000, 4000, 8000, 16000), "batch": (8, 32), "classes": (2, 4), "dim": 768, "rows": 67_349}
# Issue 13's targets: CARL's extra cost over FreeLB at init_mag 0 (the first pass is the clean view), at init_mag > 0
# (the clean forward-backward is a pass of its own), and in the bank-writing window (no L_D, no graph).
GOALS = [("carl/freelb", key, 1.15) for key in ("albert_ag", "minilm_ag")]
GOALS += [("carl/freelb", key, 1.55) for key in ("albert", "minilm")]
GOALS += [("carl_bank/freelb", key, 1.10) for key in CASES]
QUICK = {"seq_len": 16, "batch": 8, "albert": (0, 1), "minilm": (1, 3), "m": (1000, 4000, 16000)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of: " + ", ".join(PARTS))
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ", ".join(METHODS))
    p.add_argument("--albert-rounds", type=int, default=3, help="timed rounds of the ALBERT cases (default 3)")
    p.add_argument("--minilm-rounds", type=int, default=10, help="timed rounds of the MiniLM cases (default 10)")
    p.add_argument("--quick", action="store_true", help="ALBERT batches of 8 x 16 tokens, 1 round, 3 MiniLM rounds")
    p.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml", help="where the values come from")
    p.add_argument("--albert", type=Path, default=ROOT.parent / "shared" / "albert", help="albert-base-v2's config")
    p.add_argument(
        "--raw-dir",
        type=Path,
        default=Path(os.environ.get("RAW_DIR", ROOT.parent / "shared" / "data")),
        help="folder with sst2/train.tsv and ag_news/train.csv (or train_partial.csv); default $RAW_DIR",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; 1 is steadier on a loaded machine")
    p.add_argument(
        "--release-host-memory",
        action="store_true",
        help="leave glibc's malloc at its default, which gives freed memory back to the kernel (carlrar's CLI keeps "
        "it: carlrar.host_memory); a run with and one without measure what that is worth",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every figure here")
    p.add_argument("--report", type=Path, default=None, metavar="JSON", help="print a saved run's tables")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for flag, allowed in (("parts", PARTS), ("methods", METHODS)):
        given = {s.strip() for s in getattr(args, flag).split(",") if s.strip()}
        if not given or given - set(allowed):
            named = f"unknown {', '.join(sorted(given - set(allowed)))}" if given else "none given"
            p.error(f"--{flag}: {named}; choose from {', '.join(allowed)}")
        setattr(args, flag, [a for a in allowed if a in given])
    if args.albert_rounds < 1 or args.minilm_rounds < 1:
        p.error("--albert-rounds and --minilm-rounds must be at least 1")
    return args


def pick_device(name: str) -> torch.device:
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CarlrarError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
    return device


# --- the cases ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One model at one dataset's values: how to build it, its training labels, and its batches in order."""

    key: str
    spec: ModelSpec
    shape: Shape
    labels: Tensor | None  # None: random labels in the dataset's proportions (carlrar's bank_labels)
    batches: Callable[[Trainer, int], Batch]  # the batch of round r
    warmup: int
    rounds: int


def albert_case(key: str, dataset: str, config: Config, args: argparse.Namespace) -> Case:
    shape = dataset_shape(config, dataset, ALBERT_LENGTHS[dataset])
    warmup, rounds = QUICK["albert"] if args.quick else (1, args.albert_rounds)
    if args.quick:
        shape = dataclasses.replace(shape, batch_size=QUICK["batch"], seq_len=QUICK["seq_len"])
    batches = functools.partial(step_batch, shape=shape, seed=args.seed)
    return Case(key, albert_spec(args.albert), shape, None, lambda tr, r: batches(tr, step=r), warmup, rounds)


def minilm_case(key: str, dataset: str, config: Config, args: argparse.Namespace) -> Case:
    """Real training rows, tokenised and dynamically padded (SPEC 3); the banks hold every row of the file."""
    names = ["train.tsv"] if dataset == "sst2" else ["train.csv", "train_partial.csv"]
    path = next((args.raw_dir / dataset / n for n in names if (args.raw_dir / dataset / n).is_file()), None)
    if path is None:
        raise CarlrarError(
            f"{args.raw_dir / dataset} holds none of {names}: pass --raw-dir, or leave out --parts {key}"
        )
    split = read_file(path, DATASETS[dataset])
    labels = torch.tensor(split.labels)
    shape = dataclasses.replace(dataset_shape(config, dataset), bank_rows=len(labels))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    spec = minilm_spec()
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(spec.name))

    def batch(tr: Trainer, r: int) -> Batch:
        rows = order[r * shape.batch_size : (r + 1) * shape.batch_size]
        texts = [split.texts[i] for i in rows.tolist()]
        enc = tokenizer(texts, truncation=True, max_length=shape.seq_len, padding=True, return_tensors="pt")
        return Batch(enc["input_ids"], enc["attention_mask"], labels[rows], rows)

    warmup, rounds = QUICK["minilm"] if args.quick else (2, args.minilm_rounds)
    return Case(key, spec, shape, labels, batch, warmup, rounds)


def trainers(case: Case, config: Config, args: argparse.Namespace, device: torch.device) -> dict[str, Trainer]:
    """One trainer per method, each from the same initial weights; carl_bank is carl with tau out of reach."""
    built = {}
    for name in args.methods:
        method, tau = ("carl", BANK_WINDOW) if name == "carl_bank" else (name, 0)
        built[name] = build_trainer(config, case.spec, case.shape, method, args.seed, device, case.labels, tau)
    return built


# --- measurements ------------------------------------------------------------------------------------------------


def time_rounds(case: Case, trs: dict[str, Trainer], device: torch.device, amp: torch.dtype | None) -> dict:
    """Round-robin over the methods; per method the step times, median, fastest and last losses."""
    first = next(iter(trs.values()))
    times: dict[str, list[float]] = {name: [] for name in trs}
    cpu: dict[str, list[float]] = {name: [] for name in trs}
    losses: dict[str, dict] = {}
    tokens = []
    for r in range(case.warmup + case.rounds):
        batch = case.batches(first, r).to(device)
        for name, tr in trs.items():
            tr.model.train()
            losses[name], timing = timed(functools.partial(train_step, tr, batch, r, amp), device)
            if r >= case.warmup:
                times[name].append(timing.wall_s)
                cpu[name].append(timing.cpu_s)
            note = " (warm-up)" if r < case.warmup else ""
            print(f"  [{case.key}] round {r + 1}{note} {name}: {timing.wall_s:.2f} s", file=sys.stderr, flush=True)
        tokens.append(int(batch.attention_mask.sum()))
    assert "carl" not in losses or "carl" in losses["carl"], "CARL's loss was not on"
    assert "carl_bank" not in losses or "carl" not in losses["carl_bank"], "CARL's loss ran in its bank window"
    per_method = {
        name: {
            "step_s": statistics.median(ts),
            "min_step_s": min(ts),
            "cpu_s": statistics.median(cpu[name]),
            "samples_per_s": case.shape.batch_size / statistics.median(ts),
            "all_step_s": ts,
            "losses": losses[name],
        }
        for name, ts in times.items()
    }
    ratios = {
        f"{a}/{b}": {
            "median_of_rounds": statistics.median(x / y for x, y in zip(times[a], times[b])),
            "of_medians": per_method[a]["step_s"] / per_method[b]["step_s"],
        }
        for a, b in RATIOS
        if a in times and b in times
    }
    return {"methods": per_method, "ratios": ratios, "tokens_per_batch": statistics.mean(tokens[case.warmup :])}


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
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

    def walk(events: list) -> Iterator[Any]:
        for event in events:
            yield event
            yield from walk(event.children)

    events = walk(prof.profiler.kineto_results.experimental_event_tree())
    current = peak = 0
    for event in sorted((e for e in events if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns):
        current += event.extra_fields.alloc_size  # every allocation (+) and free (-), in order
        peak = max(peak, current)
    return peak


def step_memory(case: Case, trs: dict[str, Trainer], device: torch.device, amp: torch.dtype | None) -> dict:
    """Peak MiB of each method's passes on one batch, gradients set to None before them."""
    batch = case.batches(next(iter(trs.values())), case.warmup + case.rounds).to(device)
    peaks = {}
    for name, tr in trs.items():
        tr.optimizer.zero_grad(set_to_none=True)
        call = functools.partial(adversarial_backward, tr.model, batch, tr.method.freelb, tr.method.auxiliaries, 0, amp)
        peaks[name] = peak_extra_bytes(call, device) / MiB
        tr.optimizer.zero_grad(set_to_none=True)
    return peaks


def carl_backward(loss: CARLLoss, rows: Tensor, labels: Tensor, views: Tensor) -> None:
    """L_D's forward and backward for two live [batch, dim] views stacked in ``views``."""
    loss(rows, labels, views[0], views[1]).backward()


def carl_loss_alone(trs: dict[str, Trainer], batch_size: int, device: torch.device, reps: int = 5) -> float | None:
    """Median seconds of L_D's forward + backward on random [batch, dim] views (bank gather, products, NCE)."""
    objective = next((a for tr in trs.values() for a in tr.method.auxiliaries if isinstance(a, CARLObjective)), None)
    if objective is None:
        return None
    loss, generator, times = objective.contrast, torch.Generator().manual_seed(1), []
    labels, dim = loss.sampler.labels, loss.bank_orig.rows.shape[1]
    for _ in range(reps + 1):
        rows = torch.randperm(len(labels), generator=generator)[:batch_size]
        idx, lab = rows.to(device), labels[rows].to(device)
        views = torch.randn(2, batch_size, dim, device=device, requires_grad=True)
        _, timing = timed(functools.partial(carl_backward, loss, idx, lab, views), device)
        times.append(timing.wall_s)
    return statistics.median(times[1:])  # the first call also sets Z


def memory_sweep(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Peak extra memory of L_D (forward + backward; banks excluded) over m, batch size and class count."""
    dim, rows, out = SWEEP["dim"], SWEEP["rows"], []
    ms = QUICK["m"] if args.quick else SWEEP["m"]
    for classes in SWEEP["classes"]:
        labels = torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(args.seed))
        banks = prefilled_carl(labels, dim, max(ms), device, args.seed)
        for m in ms if classes == SWEEP["classes"][0] else ms[-1:]:  # more classes: the largest m only
            loss = CARLLoss(labels, dim, m, seed=args.seed).to(device)
            loss.bank_orig, loss.bank_adv = banks.bank_orig, banks.bank_adv  # share the filled banks
            for batch_size in SWEEP["batch"]:
                per_class = [(labels == c).nonzero().squeeze(1)[: batch_size // classes] for c in range(classes)]
                picked = torch.cat(per_class)  # every class present, as in a real batch of this size
                idx, lab = picked.to(device), labels[picked].to(device)
                views = torch.randn(2, len(idx), dim, device=device, requires_grad=True)
                call = functools.partial(carl_backward, loss, idx, lab, views)
                call()  # sets Z; the measured call is a steady-state one
                peak = peak_extra_bytes(call, device) / MiB
                out.append(
                    {
                        "classes": classes,
                        "m": m,
                        "batch": len(idx),
                        "measured MiB": peak,
                        "2 banks x C x m x dim x 4 B": 2 * classes * m * dim * 4 / MiB,
                        "2 banks x B x m x dim x 4 B (never built)": 2 * len(idx) * m * dim * 4 / MiB,
                    }
                )
                print(f"  [memory] classes {classes} m {m} batch {len(idx)}: {peak:.1f} MiB", file=sys.stderr)
    return out


def run_case(case: Case, config: Config, args: argparse.Namespace, device: torch.device, amp: Any) -> dict:
    trs = trainers(case, config, args, device)
    result = time_rounds(case, trs, device, amp)
    result["carl_loss_alone_s"] = carl_loss_alone(trs, case.shape.batch_size, device)
    if "step-memory" in args.parts:
        result["peak_step_mib"] = step_memory(case, trs, device, amp)
    return {"shape": dataclasses.asdict(case.shape), "rounds": case.rounds, "warmup": case.warmup, **result}


# --- report ------------------------------------------------------------------------------------------------------


def case_report(key: str, res: dict[str, Any]) -> str:
    """A case's title, its Markdown table, the ratios and L_D's share of a freelb step."""
    s, fl = res["shape"], res["shape"]["freelb"]
    model, dataset = CASES[key]
    title = (
        f"({key}) {model}, {dataset}: batch {s['batch_size']} (mean {res['tokens_per_batch']:.0f} real tokens), "
        f"init_mag {fl['init_mag']}, adv_lr {fl['adv_lr']}, K = {fl['adv_steps']}, banks {s['bank_rows']:,} rows, "
        f"m = {s['negatives']:,}, {res['rounds']} timed rounds"
    )
    peaks = res.get("peak_step_mib", {})
    rows = [
        [
            name,
            f"{r['step_s']:.3f}",
            f"{r['samples_per_s']:.2f}",
            f"{r['min_step_s']:.3f}",
            f"{peaks[name]:,.1f}" if name in peaks else "-",
            ", ".join(f"{k} {v:.3f}" for k, v in r["losses"].items() if k != "grad_norm"),
        ]
        for name, r in res["methods"].items()
    ]
    header = ["method", "median step (s)", "samples/s", "fastest step (s)", "peak MiB of the passes", "losses"]
    ratios = ", ".join(f"{k} {v['median_of_rounds']:.3f} ({v['of_medians']:.3f})" for k, v in res["ratios"].items())
    lines = [title, "", markdown_table(header, rows), "", f"Median per-round ratios (of the medians): {ratios}."]
    if res["carl_loss_alone_s"] is not None and "freelb" in res["methods"]:
        alone = res["carl_loss_alone_s"]
        share = alone / res["methods"]["freelb"]["step_s"] * 100
        lines.append(f"L_D alone: {alone * 1000:.1f} ms, {share:.2f} % of a freelb step.")
    return "\n".join(lines)


def memory_report(rows: list[dict[str, Any]]) -> str:
    title = f"Peak extra memory of L_D (forward + backward; banks excluded), dim {SWEEP['dim']}"
    return f"{title}\n\n" + markdown_table(list(rows[0]), [list(r.values()) for r in rows], "{:,.1f}")


def goals_report(report: dict[str, Any]) -> str:
    """The targets against this run: the median per-round ratio (the ratio of the median steps in brackets)."""
    rows = []
    for ratio, key, goal in GOALS:
        measured = report.get(key, {}).get("ratios", {}).get(ratio)
        if measured is not None:
            fl = report[key]["shape"]["freelb"]
            case = f"{key} (K = {fl['adv_steps']}, init_mag {fl['init_mag']})"
            figure = f"{measured['median_of_rounds']:.3f} ({measured['of_medians']:.3f})"
            met = "yes" if measured["median_of_rounds"] <= goal else "no"
            rows.append([ratio, case, f"<= {goal:.2f}", figure, met])
    return markdown_table(["ratio", "case", "goal", "measured", "met"], rows) if rows else ""


def header(report: dict[str, Any]) -> str:
    m, a = report["machine"], report["args"]
    where = f"{m['device']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads), torch {m['torch']}"
    return f"{where}, amp {a['amp']}, freed host memory {'kept' if a['host_memory_kept'] else 'released'}"


def render(report: dict[str, Any]) -> str:
    """Every section of a saved report (``--json``), as the run printed them."""
    sections = [header(report), *(case_report(key, report[key]) for key in CASES if key in report)]
    if "memory" in report:
        sections.append(memory_report(report["memory"]))
    return "\n\n".join(filter(None, [*sections, goals_report(report)]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        print(render(json.loads(args.report.read_text(encoding="utf-8"))))
        return 0
    try:
        device = pick_device(args.device)
        config = load_config(args.config)
        if args.json:
            check_output_file(args.json, "--json")
        chosen = [(key, model, dataset) for key, (model, dataset) in CASES.items() if key in args.parts]
        cases = [(albert_case if m == "albert" else minilm_case)(k, d, config, args) for k, m, d in chosen]
    except (CarlrarError, OSError) as exc:
        print(f"bench_steps.py: {exc}", file=sys.stderr)
        return 2
    amp = torch.bfloat16 if device.type == "cuda" else None  # autocast as in training: bf16 on CUDA only
    kept = not args.release_host_memory and keep_host_memory()  # as carlrar's CLI does
    options = {k: os.path.relpath(v, ROOT) if isinstance(v, Path) else v for k, v in vars(args).items()}
    started, report = time.perf_counter(), {"args": options | {"amp": str(amp), "host_memory_kept": kept}}
    with quiet(args.threads):
        report["machine"] = machine_info(device)
        print(header(report))
        for case in cases:  # each section printed as soon as it is measured
            report[case.key] = run_case(case, config, args, device, amp)
            print("\n" + case_report(case.key, report[case.key]), flush=True)
        if "memory" in args.parts:
            report["memory"] = memory_sweep(args, device)
            print("\n" + memory_report(report["memory"]))
    report["seconds"] = time.perf_counter() - started
    print("\n" + goals_report(report) + f"\n\n{report['seconds']:.0f} s in all")
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
