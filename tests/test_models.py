"""The classifier: parameter count (Table 7), FreeLB's embedding interface, R, and name loading."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no network here

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from helpers.models import TINY_ALBERT, TINY_BERT
from helpers.paths import SHARED
from safetensors.torch import load_file
from torch import nn
from transformers import AlbertModel

from carlrar.models import ModelLoadError, TextClassifier, count_parameters, load_model

ALBERT = SHARED / "albert"
TINY = {f"random:{ALBERT}": TINY_ALBERT, "random:minilm-l6": TINY_BERT}


def tiny(name: str, num_labels: int = 3) -> TextClassifier:
    torch.manual_seed(0)
    model, _ = load_model(name, num_labels, TINY[name])
    return model.eval()


def batch(vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, vocab_size, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def test_albert_base_parameter_count() -> None:
    model, _ = load_model(f"random:{ALBERT}", 2)
    assert count_parameters(model) == 11_685_122  # Table 7
    assert model.dropout.p == 0.1  # classifier_dropout_prob


def test_random_weights_follow_torch_seed() -> None:
    first, second = tiny(f"random:{ALBERT}"), tiny(f"random:{ALBERT}")
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert first.word_embeddings().weight.std() > 0


@pytest.mark.parametrize("name", list(TINY))
def test_embed_is_the_raw_lookup(name: str) -> None:
    model = tiny(name)
    ids = batch(model.config.vocab_size)["input_ids"]
    table = model.word_embeddings()
    assert isinstance(table, nn.Embedding)
    expected_dim = getattr(model.config, "embedding_size", model.config.hidden_size)
    assert model.embed(ids).shape == (*ids.shape, expected_dim)
    assert torch.equal(model.embed(ids), table.weight[ids])


@pytest.mark.parametrize("name", list(TINY))
def test_inputs_embeds_reproduces_input_ids(name: str) -> None:
    model = tiny(name)
    inputs = batch(model.config.vocab_size)
    with torch.no_grad():
        from_ids = model(**inputs)
        embeds = model.embed(inputs["input_ids"])
        from_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    for field in ("logits", "sentence", "tokens"):
        torch.testing.assert_close(getattr(from_embeds, field), getattr(from_ids, field))
    assert from_ids.logits.shape == (2, 3)
    assert from_ids.sentence.shape == (2, model.config.hidden_size)
    assert from_ids.tokens.shape == (2, 7, model.config.hidden_size)


def test_exactly_one_input_is_required() -> None:
    model = tiny(f"random:{ALBERT}")
    ids = batch(model.config.vocab_size)["input_ids"]
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=model.embed(ids))


def test_sentence_is_pooled_output_when_there_is_a_pooler() -> None:
    model = tiny(f"random:{ALBERT}")
    inputs = batch(model.config.vocab_size)
    with torch.no_grad():
        out = model(**inputs)
        pooled = model.encoder(**inputs).pooler_output
    torch.testing.assert_close(out.sentence, pooled)
    assert not torch.allclose(out.sentence, out.tokens[:, 0])

    with pytest.raises(ValueError, match="no pooler; choose pooling 'cls' or 'mean'"):
        TextClassifier(AlbertModel(model.config, add_pooling_layer=False), 3)


@pytest.mark.parametrize("name", sorted(TINY))
def test_cls_and_mean_pooling_drop_the_pooler_and_read_the_token_states(name: str) -> None:
    inputs = batch(tiny(name).config.vocab_size)
    for pooling in ("cls", "mean"):
        torch.manual_seed(0)
        model, _ = load_model(name, 3, TINY[name], pooling=pooling)
        model.eval()
        assert model.encoder.pooler is None  # neither computed nor counted (Table 7)
        with torch.no_grad():
            out = model(**inputs)
        if pooling == "cls":
            expected = out.tokens[:, 0]
        else:  # the second sentence has 4 real tokens: padding must not enter its mean
            expected = torch.stack([out.tokens[0].mean(0), out.tokens[1, :4].mean(0)])
        torch.testing.assert_close(out.sentence, expected)
        torch.testing.assert_close(out.logits, model.classifier(out.sentence))
    pooler_size = sum(p.numel() for p in tiny(name).encoder.pooler.parameters())
    assert count_parameters(tiny(name)) - count_parameters(model) == pooler_size > 0


def test_unknown_pooling_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="pooling 'max' is not one of pooler, cls, mean"):
        load_model(f"random:{ALBERT}", 2, TINY_ALBERT, pooling="max")


def test_count_parameters_counts_tied_weights_once() -> None:
    first, second = nn.Linear(4, 5), nn.Linear(4, 5, bias=False)
    second.weight = first.weight
    assert count_parameters(nn.ModuleList([first, second])) == 4 * 5 + 5


def test_minilm_loads_offline_with_its_pooler() -> None:
    model, tokenizer = load_model("minilm-l6", 3)
    encoded = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.eval()(**encoded)
    assert out.logits.shape == (2, 3)
    assert torch.isfinite(out.logits).all()
    checkpoint = load_file(Path(model.config.name_or_path) / "model.safetensors")
    assert torch.equal(model.encoder.pooler.dense.weight, checkpoint["pooler.dense.weight"])


def test_missing_local_folder_is_explained(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(missing), 2)


def test_unknown_hub_name_offline_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model") as error:
        load_model("no-such-org/no-such-model", 2)
    assert "hub is unreachable" in str(error.value)
    assert "folder" in str(error.value)


def test_config_only_folder_points_to_random() -> None:
    with pytest.raises(ModelLoadError, match="random:"):
        load_model(str(ALBERT), 2)


def test_overrides_need_random_weights() -> None:
    with pytest.raises(ModelLoadError, match="random:"):
        load_model("minilm-l6", 2, {"hidden_size": 32})
    with pytest.raises(ModelLoadError, match="no setting 'hidden_sise'"):
        load_model(f"random:{ALBERT}", 2, {"hidden_sise": 32})
