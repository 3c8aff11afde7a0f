"""RAR's reconstructor (paper 3.3, Eq. 7): the original tokens from adversarial token states.

The reconstructor is the architecture's own masked-LM head (ALBERT: dense H->E, GELU, LayerNorm(E),
decoder E->V), taken from ``AutoModelForMaskedLM`` so that any encoder works and a checkpoint's
pretrained head is reused. Its decoder weight IS the classifier's word-embedding matrix (the same
``nn.Parameter``), so the reconstruction loss also trains the embeddings FreeLB perturbs, and RAR
adds only the head's own parameters (Table 7: 128,688 for albert-base-v2).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForMaskedLM, PreTrainedTokenizerBase

from carlrar.models import TextClassifier, load_error, parse_name, resolve_source

logger = logging.getLogger(__name__)


class Reconstructor(nn.Module):
    """Maps token states [B, L, H] to vocabulary logits [B, L, V] with an MLM head."""

    def __init__(self, head: nn.Module, decoder_path: str) -> None:
        super().__init__()
        self.head = head
        self.decoder_path = decoder_path

    @property
    def decoder(self) -> nn.Linear:
        """The output projection whose weight is the tied word-embedding matrix."""
        return self.head.get_submodule(self.decoder_path)

    def forward(self, token_states: torch.Tensor) -> torch.Tensor:
        return self.head(token_states)


def build_reconstructor(model: TextClassifier, name: str) -> Reconstructor:
    """Build the MLM head for ``model`` and tie its decoder to the model's word embeddings.

    ``name`` is the one given to ``load_model``: a pretrained source contributes its checkpoint's
    MLM head weights (albert-base-v2 has them); a ``random:`` source gets a head initialised from
    the current torch seed, shaped by ``model.config`` (which already carries any overrides).
    """
    source, random_init = parse_name(name)
    if random_init:
        mlm = AutoModelForMaskedLM.from_config(copy.deepcopy(model.config))
        missing: set[str] = set()
    else:
        resolved = resolve_source(source)
        try:
            mlm, info = AutoModelForMaskedLM.from_pretrained(resolved, output_loading_info=True)
        except OSError as exc:
            raise load_error(name, resolved, exc) from exc
        missing = set(info["missing_keys"])

    heads = [(key, child) for key, child in mlm.named_children() if key != mlm.base_model_prefix]
    if len(heads) != 1:
        raise ValueError(f"expected one head beside the encoder in {type(mlm).__name__}: {heads}")
    head_name, head = heads[0]
    decoder = mlm.get_output_embeddings()
    decoder_path = next(path for path, module in head.named_modules() if module is decoder)

    embedding = model.word_embeddings().weight
    if decoder.weight.shape != embedding.shape:
        raise ValueError(
            f"MLM decoder {tuple(decoder.weight.shape)} does not match the word embeddings "
            f"{tuple(embedding.shape)}: build the reconstructor from the classifier's own source"
        )
    head.to(device=embedding.device, dtype=embedding.dtype)
    decoder.weight = embedding  # tie: the very same Parameter, not a copy

    untrained = sorted(key for key in missing if key.startswith(f"{head_name}.") and not key.endswith("decoder.weight"))
    if untrained:
        logger.warning(
            "%s has no pretrained masked-LM head; RAR's reconstructor starts from random weights "
            "(tied word embeddings excepted): %s",
            name,
            ", ".join(untrained),
        )
    return Reconstructor(head, decoder_path)


def reconstruction_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L_R: cross-entropy against the original ids, averaged over real tokens (specials included).

    Padding is excluded so that batch padding does not dilute the loss; the softmax over the
    vocabulary is taken in fp32 so that mixed precision does not distort it.
    """
    real = attention_mask.bool()
    return F.cross_entropy(logits[real].float(), input_ids[real])


def decode_argmax(logits: torch.Tensor, attention_mask: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The reconstructed sentences: most likely token per real position, special tokens dropped.

    RAR turns attacked token states into text this way (paper Table 6).
    """
    ids = logits.argmax(dim=-1)
    return [
        tokenizer.decode(row[mask].tolist(), skip_special_tokens=True) for row, mask in zip(ids, attention_mask.bool())
    ]


def head_state(reconstructor: Reconstructor) -> dict[str, torch.Tensor]:
    """The head's own parameters and buffers, without the tied decoder weight (that is the embedding matrix)."""
    tied = f"head.{reconstructor.decoder_path}.weight"
    return {key: value.detach().clone() for key, value in reconstructor.state_dict().items() if key != tied}


def load_head_state(reconstructor: Reconstructor, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`head_state` saved; the tied decoder weight stays the model's embedding matrix."""
    missing, unexpected = reconstructor.load_state_dict(state, strict=False)
    if unexpected or missing != [f"head.{reconstructor.decoder_path}.weight"]:
        raise ValueError(f"reconstructor state does not fit this head (missing {missing}, unexpected {unexpected})")


@torch.no_grad()
def token_accuracy(model: TextClassifier, reconstructor: Reconstructor, batches: Iterable[Any]) -> float:
    """Share of real tokens (specials included) whose argmax reconstruction from clean states is the input token.

    Measured on clean inputs with model and head in eval mode: how well RAR's reconstructor decodes at all, before
    any adversary. ``batches`` yields :class:`carlrar.adversary.Batch` objects already on the model's device.
    """
    was_training = model.training, reconstructor.training
    model.eval()
    reconstructor.eval()
    correct = total = 0
    for batch in batches:
        real = batch.attention_mask.bool()
        states = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).tokens[real]
        correct += int((reconstructor(states).argmax(-1) == batch.input_ids[real]).sum())
        total += int(real.sum())
    model.train(was_training[0])
    reconstructor.train(was_training[1])
    return correct / total if total else float("nan")


def warm_up(
    model: TextClassifier,
    reconstructor: Reconstructor,
    batches: Iterable[Any],
    learning_rate: float,
    amp_dtype: torch.dtype | None = None,
) -> list[float]:
    """Fit the head alone on clean inputs: encoder, word embeddings and the tied decoder weight stay frozen.

    A backbone without a pretrained masked-LM head (MiniLM) would otherwise start RAR from a random head whose
    loss, at weight 0.1, fights the classification loss for the whole run. The encoder runs in eval mode without
    a graph, so a warm-up step costs one forward pass plus the head. Returns the loss of each step.

    ``amp_dtype`` autocasts each step's forward passes. Autocast is entered per step on purpose: inside one
    autocast region the low-precision copy of a weight is cached, so a region spanning optimizer steps keeps
    using the first step's weights (measured: the loss stayed at 10.8 over 25 bf16 steps, 3.1 when entered per step).
    """
    tied = reconstructor.decoder.weight
    params = [p for p in reconstructor.parameters() if p is not tied]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    was_training, tied_requires_grad = model.training, tied.requires_grad
    model.eval()
    reconstructor.train()
    tied.requires_grad_(False)  # the embedding matrix is the classifier's: no gradient, and none computed
    losses = []
    try:
        for batch in batches:
            real = batch.attention_mask.bool()
            amp = torch.autocast(batch.input_ids.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
            with amp:
                with torch.no_grad():
                    states = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).tokens[real]
                logits = reconstructor(states)
            loss = F.cross_entropy(logits.float(), batch.input_ids[real])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        tied.requires_grad_(tied_requires_grad)
        model.train(was_training)
    return losses


__all__ = [
    "Reconstructor",
    "build_reconstructor",
    "decode_argmax",
    "head_state",
    "load_head_state",
    "reconstruction_loss",
    "token_accuracy",
    "warm_up",
]


class RARObjective(nn.Module):
    """RAR as an auxiliary loss: w_r * L_R on the last FreeLB pass's token states, from step 0 (Eq. 7)."""

    name = "rar"

    def __init__(self, reconstructor: Reconstructor, weight: float = 0.1) -> None:
        super().__init__()
        self.reconstructor = reconstructor
        self.weight = weight

    def wants_clean_view(self, step: int) -> bool:
        return False

    def clean_view_needs_grad(self, step: int) -> bool:
        return False

    def loss(self, views: Any, step: int) -> torch.Tensor:
        batch = views.batch
        real = batch.attention_mask.bool()
        # The head works position by position, so only real tokens are decoded: the same loss as
        # reconstruction_loss on the full logits, without a [batch, length, vocab] tensor for the padding.
        logits = self.reconstructor(views.adversarial.tokens[real])
        return self.weight * F.cross_entropy(logits.float(), batch.input_ids[real])

    def after_backward(self, views: Any, step: int) -> None:
        return None
