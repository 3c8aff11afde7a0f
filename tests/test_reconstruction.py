"""RAR's reconstructor: parameter count (Table 7), weight tying, the loss and decoding."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no network here


import pytest
import torch
import torch.nn.functional as F
from helpers.models import RANDOM_ALBERT, TINY_ALBERT, TINY_BERT
from torch import nn
from transformers import PreTrainedTokenizerBase

from carlrar.adversary import Batch
from carlrar.models import TextClassifier, count_parameters, load_model
from carlrar.reconstruction import (
    Reconstructor,
    build_reconstructor,
    decode_argmax,
    head_state,
    load_head_state,
    reconstruction_loss,
    token_accuracy,
    warm_up,
)


@pytest.fixture(scope="module")
def tiny() -> tuple[TextClassifier, Reconstructor, PreTrainedTokenizerBase]:
    torch.manual_seed(0)
    model, tokenizer = load_model(RANDOM_ALBERT, 2, TINY_ALBERT)
    return model, build_reconstructor(model, RANDOM_ALBERT), tokenizer


def test_rar_adds_the_albert_mlm_head_only() -> None:
    model, _ = load_model(RANDOM_ALBERT, 2)
    reconstructor = build_reconstructor(model, RANDOM_ALBERT)
    total = count_parameters(nn.ModuleList([model, reconstructor]))
    assert total == 11_813_810  # Table 7
    assert total - count_parameters(model) == 128_688
    assert reconstructor.head.bias is reconstructor.decoder.bias  # ALBERT: one bias, counted once


def test_decoder_weight_is_the_embedding_parameter(tiny) -> None:
    model, reconstructor, _ = tiny
    embedding = model.word_embeddings().weight
    assert reconstructor.decoder.weight is embedding
    assert reconstructor.decoder.weight.data_ptr() == embedding.data_ptr()


def test_reconstruction_loss_trains_the_embeddings(tiny) -> None:
    model, reconstructor, tokenizer = tiny
    inputs = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    model.eval()

    def embedding_grad(weight: float) -> torch.Tensor:
        model.zero_grad()
        reconstructor.zero_grad()
        out = model(**inputs)
        loss = F.cross_entropy(out.logits, torch.tensor([0, 1]))
        logits = reconstructor(out.tokens)
        assert logits.shape == (*inputs["input_ids"].shape, model.config.vocab_size)
        rar = reconstruction_loss(logits, inputs["input_ids"], inputs["attention_mask"])
        loss = loss + weight * rar
        loss.backward()
        grad = model.word_embeddings().weight.grad
        assert grad is not None
        return grad.clone()

    without, with_rar = embedding_grad(0.0), embedding_grad(0.1)
    assert not torch.allclose(without, with_rar)


def test_reconstruction_loss_is_the_mean_over_real_tokens() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator, dtype=torch.bfloat16)
    input_ids = torch.randint(0, 11, (2, 5), generator=generator)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])

    terms = [
        -torch.log_softmax(logits[i, j].float(), dim=-1)[input_ids[i, j]]
        for i in range(2)
        for j in range(5)
        if attention_mask[i, j]
    ]
    loss = reconstruction_loss(logits, input_ids, attention_mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.stack(terms).mean())

    padded = logits.clone()
    padded[1, 2:] = 100.0
    torch.testing.assert_close(reconstruction_loss(padded, input_ids, attention_mask), loss)


def test_decode_argmax_reads_real_tokens_only(tiny) -> None:
    _, _, tokenizer = tiny
    inputs = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    filler = tokenizer.convert_tokens_to_ids("▁film")
    ids = torch.where(mask.bool(), ids, filler)  # a token on padding that must not be decoded
    logits = F.one_hot(ids, len(tokenizer)).float()
    assert decode_argmax(logits, mask, tokenizer) == ["a fine film", "dull"]


def test_checkpoint_without_mlm_head_warns(caplog: pytest.LogCaptureFixture) -> None:
    model, _ = load_model("minilm-l6", 2)
    with caplog.at_level(logging.WARNING, logger="carlrar.reconstruction"):
        reconstructor = build_reconstructor(model, "minilm-l6")
    warnings = [r for r in caplog.records if r.name == "carlrar.reconstruction"]
    assert len(warnings) == 1
    assert "no pretrained masked-LM head" in warnings[0].getMessage()
    assert reconstructor.decoder.weight is model.word_embeddings().weight


def _sentences(tokenizer: PreTrainedTokenizerBase) -> Batch:
    texts = ["a fine film", "dull and long", "the cast is good", "no plot at all", "a bad ending"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    n = len(texts)
    return Batch(inputs["input_ids"], inputs["attention_mask"], torch.zeros(n, dtype=torch.long), torch.arange(n))


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_warm_up_fits_the_head_alone_and_raises_token_accuracy(amp_dtype: torch.dtype | None) -> None:
    """Also under bf16 autocast on the CPU, which once cached the first step's weights for the whole warm-up."""
    torch.manual_seed(0)
    model, tokenizer = load_model("random:minilm-l6", 2, TINY_BERT)
    reconstructor = build_reconstructor(model, "random:minilm-l6")
    batch = _sentences(tokenizer)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    head_before = {k: v.clone() for k, v in head_state(reconstructor).items()}

    before = token_accuracy(model, reconstructor, [batch])
    losses = warm_up(model, reconstructor, [batch] * 60, learning_rate=0.1, amp_dtype=amp_dtype)
    after = token_accuracy(model, reconstructor, [batch])

    assert len(losses) == 60 and losses[-1] < losses[0] / 5
    assert before < 0.2 and after > 0.9, (before, after)
    for key, value in model.state_dict().items():  # encoder, classifier and the tied embedding matrix untouched
        assert torch.equal(value, frozen[key]), key
    assert reconstructor.decoder.weight.requires_grad  # restored for RAR's own training
    assert any(not torch.equal(v, head_before[k]) for k, v in head_state(reconstructor).items())


def test_head_state_round_trip_keeps_the_decoder_tied() -> None:
    torch.manual_seed(0)
    model, _ = load_model(RANDOM_ALBERT, 2, TINY_ALBERT)
    source = build_reconstructor(model, RANDOM_ALBERT)
    state = head_state(source)
    assert not any(key.endswith("decoder.weight") for key in state)  # the embedding matrix is the model's

    torch.manual_seed(1)
    target = build_reconstructor(model, RANDOM_ALBERT)
    load_head_state(target, state)
    assert target.decoder.weight is model.word_embeddings().weight
    for key, value in head_state(target).items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match="does not fit this head"):
        load_head_state(target, {**state, "head.extra": torch.zeros(1)})
