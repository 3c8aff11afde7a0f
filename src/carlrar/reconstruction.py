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


__all__ = ["Reconstructor", "build_reconstructor", "decode_argmax", "reconstruction_loss"]


class RARObjective(nn.Module):
    """RAR as an auxiliary loss: w_r * L_R on the last FreeLB pass's token states, from step 0 (Eq. 7)."""

    name = "rar"

    def __init__(self, reconstructor: Reconstructor, weight: float = 0.1) -> None:
        super().__init__()
        self.reconstructor = reconstructor
        self.weight = weight

    def wants_clean_view(self, step: int) -> bool:
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
