"""From prepared splits to model batches: tokenise once, order each epoch, pad per batch, evaluate.

Shared by training, the reconstructor warm-up and the attacks. Batches are built from a seeded per-epoch order
and padded dynamically, so a run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from carlrar.adversary import (
    Batch,
    autocast_context,
)
from carlrar.distributed import Collective
from carlrar.models import TextClassifier

log = logging.getLogger(__name__)


@dataclass
class EncodedSplit:
    """A tokenised split: one id list per example (unpadded) and the labels."""

    ids: list[list[int]]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.ids)


def encode_split(frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, max_length: int) -> EncodedSplit:
    """Tokenise a split read (and verified) by carlrar.data.read_split."""
    ids = tokenizer(list(frame["text"]), truncation=True, max_length=max_length)["input_ids"] if len(frame) else []
    return EncodedSplit(ids=ids, labels=torch.tensor(frame["label"].to_numpy(), dtype=torch.long))


def collate(split: EncodedSplit, rows: Tensor, pad_id: int) -> Batch:
    """Pad to the longest sequence in the batch (dynamic padding, SPEC 3 step 1)."""
    seqs = [split.ids[i] for i in rows.tolist()]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return Batch(input_ids=input_ids, attention_mask=mask, labels=split.labels[rows], indices=rows.clone())


def epoch_order(num_rows: int, seed: int, epoch: int) -> Tensor:
    """The shuffle of an epoch depends only on (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator)


def batches(
    split: EncodedSplit,
    order: Tensor,
    batch_size: int,
    pad_id: int,
    start: int = 0,
    collective: Collective | None = None,
) -> Iterator[Batch]:
    """Batches of ``order`` from batch number ``start``; with several ranks, each yields its share of each batch."""
    rank, world = (collective.rank, collective.world_size) if collective else (0, 1)
    for first in range(start * batch_size, len(order), batch_size):
        rows = order[first : first + batch_size]
        if len(rows) < world:  # too few rows to give every rank one: dropped, as steps_per_epoch assumes
            return
        yield collate(split, rows.tensor_split(world)[rank], pad_id)


def steps_in_epoch(num_rows: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch; a last batch too small to give every rank a row is dropped."""
    full, rest = divmod(num_rows, batch_size)
    return full + (1 if rest >= world_size else 0)


@torch.no_grad()
def evaluate(
    model: TextClassifier,
    split: EncodedSplit,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, Tensor]:
    """Accuracy and predictions (in the split's order) on a split, in eval mode.

    The examples go through in order of length, so each batch is padded to about its own length: in the split's
    order a batch of 64 SST-2 dev sentences is about half padding, which costs as much to compute as text.
    """
    was_training = model.training
    model.eval()
    by_length = torch.tensor(sorted(range(len(split)), key=lambda row: len(split.ids[row])), dtype=torch.long)
    preds = torch.empty(len(split), dtype=torch.long)
    for batch in batches(split, by_length, batch_size, pad_id):
        on_device = batch.to(device)
        with autocast_context(device, amp_dtype):
            logits = model(input_ids=on_device.input_ids, attention_mask=on_device.attention_mask).logits
        preds[batch.indices] = logits.argmax(-1).cpu()
    model.train(was_training)
    accuracy = float((preds == split.labels).float().mean()) if len(split) else float("nan")
    return accuracy, preds
