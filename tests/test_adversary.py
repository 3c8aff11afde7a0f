"""FreeLB and the adversarial step (SPEC 3, 4, 5) against a plain re-derivation written out here.

The expected values never come from FreeLB's own helpers: the test re-seeds torch, draws delta0 the way
SPEC 3 says, runs its own forward passes with the RNG restored before each (fixed dropout masks), takes
gradients with ``torch.autograd.grad`` and steps delta example by example in plain Python. Dropout is
active (train mode, dropout 0.1 in the encoder), so a pass with other dropout masks would not match.
"""

from __future__ import annotations

import functools
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no network here

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers.models import RANDOM_ALBERT, RANDOM_MINILM
from helpers.models import TINY_BERT as TINY_BERT_WITHOUT_DROPOUT
from torch import Tensor, nn
from torch.testing import assert_close

from carlrar.adversary import Batch, FreeLB, Views, _RngSnapshot, adversarial_backward, autocast_context
from carlrar.config import FreeLBConfig
from carlrar.contrastive import CARLLoss, CARLObjective
from carlrar.models import ClassifierOutput, TextClassifier, load_model
from carlrar.reconstruction import RARObjective, build_reconstructor, reconstruction_loss

DROPOUT = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
TINY_BERT = {**TINY_BERT_WITHOUT_DROPOUT, **DROPOUT}
TINY_ALBERT = {**TINY_BERT, "embedding_size": 16}  # FreeLB perturbs the 16-dim lookup, before the 16->32 projection
TOL = {"rtol": 1e-5, "atol": 1e-6}
# L_D's logits are x1.x2 / 0.07 and its exp: summation-order rounding grows to ~2e-5 relative there, and on some
# CPUs' kernels to 2.6e-4 on a single element near zero (measured: 1 of 16,384, |diff| 1.7e-5); a real error in
# the composition moves whole tensors by orders of magnitude more.
CARL_TOL = {"rtol": 1e-3, "atol": 5e-5}

# (init_mag, adv_lr, adv_max_norm, K, norm_type)
SST2 = (0.6, 0.1, 0.0, 2, "l2")  # Table 1
YAHOO = (0.0, 0.01, 0.0, 3, "l2")  # Table 1: zero init
L2_PROJECTED = (0.6, 0.5, 0.7, 3, "l2")  # the second ascent step leaves the ball
LINF_PROJECTED = (0.05, 0.03, 0.04, 3, "linf")


def freelb(init_mag: float, adv_lr: float, adv_max_norm: float, k: int, norm_type: str) -> FreeLB:
    return FreeLB(
        FreeLBConfig(init_mag=init_mag, adv_lr=adv_lr, adv_max_norm=adv_max_norm, adv_steps=k, norm_type=norm_type)
    )


def tiny_model(name: str) -> TextClassifier:
    torch.manual_seed(0)
    model, _ = load_model(name, 2, TINY_ALBERT if name == RANDOM_ALBERT else TINY_BERT)
    return model.train()


@pytest.fixture(scope="module")
def bert() -> TextClassifier:
    return tiny_model(RANDOM_MINILM)


@pytest.fixture(scope="module")
def albert() -> TextClassifier:
    return tiny_model(RANDOM_ALBERT)


@pytest.fixture(params=["minilm", "albert"])
def model(request: pytest.FixtureRequest) -> TextClassifier:
    return request.getfixturevalue("bert" if request.param == "minilm" else "albert")


# 12 training rows (labels alternate); a batch takes rows 2, 7, 5, 10 with real lengths 7, 5, 3, 6.
DATASET_LABELS = torch.tensor([0, 1] * 6)
BATCH_ROWS = torch.tensor([2, 7, 5, 10])


def make_batch(vocab_size: int, lengths: tuple[int, ...] = (7, 5, 3, 6)) -> Batch:
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)  # dynamically padded: the longest sequence has no padding
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    ids = torch.randint(5, vocab_size, (len(lengths), width), generator=generator) * mask  # pad id 0
    rows = BATCH_ROWS[: len(lengths)]
    return Batch(input_ids=ids, attention_mask=mask, labels=DATASET_LABELS[rows], indices=rows)


def unique_parameters(*modules: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, a tied parameter once."""
    seen: dict[int, tuple[str, nn.Parameter]] = {}
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            seen.setdefault(id(p), (f"{i}.{name}", p))
    return dict(seen.values())


def zero_grads(*modules: nn.Module) -> None:
    for module in modules:
        module.zero_grad(set_to_none=True)


# --- the independent re-derivation ---------------------------------------------------------------------------


def draw_delta0(shape: torch.Size, mask: Tensor, init_mag: float, norm_type: str) -> Tensor:
    """SPEC 3 step 2, written out example by example."""
    batch, _, emb_dim = shape
    if init_mag == 0:
        return torch.zeros(shape)
    if norm_type == "l2":
        noise = torch.empty(shape).uniform_(-1, 1)
    else:
        noise = torch.empty(shape).uniform_(-init_mag, init_mag)
    delta = torch.zeros(shape)
    for b in range(batch):
        real = mask[b].unsqueeze(-1).float()
        if norm_type == "l2":
            n_real = int(mask[b].sum())
            delta[b] = noise[b] * real * init_mag / math.sqrt(n_real * emb_dim)
        else:
            delta[b] = noise[b] * real
    return delta


def ascent_step(
    delta: Tensor, grad: Tensor, mask: Tensor, adv_lr: float, adv_max_norm: float, norm_type: str
) -> tuple[Tensor, bool]:
    """SPEC 3 step 3 for t < K, example by example; also says whether a projection changed anything."""
    out = torch.zeros_like(delta)
    projected = False
    for b in range(delta.shape[0]):
        g = grad[b]
        norm = g.norm() if norm_type == "l2" else g.abs().max()
        new = delta[b] + adv_lr * g / max(float(norm), 1e-8)
        if adv_max_norm > 0:
            if norm_type == "l2" and float(new.norm()) > adv_max_norm:
                new = new * (adv_max_norm / new.norm())
                projected = True
            elif norm_type == "linf" and float(new.abs().max()) > adv_max_norm:
                new = new.clamp(-adv_max_norm, adv_max_norm)
                projected = True
        out[b] = new * mask[b].unsqueeze(-1).float()
    return out, projected


Extra = Callable[[ClassifierOutput, ClassifierOutput | None], Tensor]


def rederive(
    model: TextClassifier,
    batch: Batch,
    hp: tuple,
    seed: int,
    params: dict[str, nn.Parameter],
    extra: Extra | None = None,
    clean_pass: bool = False,
    restore_rng: bool = True,
) -> dict:
    """The accumulated gradient of one FreeLB step: sum over the K passes of grad(CE / K), aux on the last."""
    init_mag, adv_lr, adv_max_norm, k, norm_type = hp
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    table = model.encoder.get_input_embeddings().weight
    torch.manual_seed(seed)
    delta = draw_delta0(torch.Size((*ids.shape, table.shape[1])), mask, init_mag, norm_type)
    state = torch.get_rng_state()
    clean = None
    if clean_pass:
        torch.set_rng_state(state)
        clean = model(inputs_embeds=F.embedding(ids, table), attention_mask=mask)
    names = list(params)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    ce_values, projected_any, last, extra_value = [], False, None, None
    for t in range(k):
        if restore_rng:
            torch.set_rng_state(state)
        d = delta.clone().requires_grad_(True)
        out = model(inputs_embeds=F.embedding(ids, table) + d, attention_mask=mask)
        ce = F.cross_entropy(out.logits, labels)
        ce_values.append(float(ce.detach()))
        loss = ce / k
        if t == k - 1 and extra is not None:
            extra_value = extra(out, clean)
            loss = loss + extra_value
        grads = torch.autograd.grad(loss, [params[n] for n in names] + [d], allow_unused=True)
        for name, g in zip(names, grads[:-1]):
            if g is not None:
                total[name] += g
        if t < k - 1:
            g_delta = grads[-1]
            # the model never reads padding positions, so masking g before or after its norm is the same
            assert torch.all(g_delta[~mask.bool()] == 0)
            delta, projected = ascent_step(delta, g_delta, mask, adv_lr, adv_max_norm, norm_type)
            projected_any |= projected
        last = out
    return {
        "grads": total,
        "ce": sum(ce_values) / k,
        "projected": projected_any,
        "clean": clean,
        "logits": last.logits.detach(),
        "sentence": last.sentence.detach(),
        "extra": extra_value,
    }


def assert_grads_equal(params: dict[str, nn.Parameter], expected: dict[str, Tensor], tol: dict = TOL) -> None:
    for name, p in params.items():
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        assert_close(got, expected[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


# --- initial delta -----------------------------------------------------------------------------------------------


def test_initial_delta_is_zero_without_init_mag(model: TextClassifier) -> None:
    batch = make_batch(model.config.vocab_size)
    embeds = model.embed(batch.input_ids)
    delta = freelb(0.0, 0.1, 0.0, 2, "l2").initial_delta(embeds, batch.attention_mask)
    assert delta.shape == embeds.shape and delta.dtype == torch.float32
    assert torch.count_nonzero(delta) == 0


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_initial_delta_is_the_spec_draw(model: TextClassifier, norm_type: str) -> None:
    init_mag = 0.6
    batch = make_batch(model.config.vocab_size)
    mask = batch.attention_mask
    embeds = model.embed(batch.input_ids).detach()
    emb_dim = model.encoder.get_input_embeddings().weight.shape[1]
    assert embeds.shape[-1] == emb_dim  # the raw lookup (ALBERT: 16), not the hidden size (32)
    torch.manual_seed(123)
    delta = freelb(init_mag, 0.1, 0.0, 2, norm_type).initial_delta(embeds.to(torch.bfloat16), mask)
    torch.manual_seed(123)
    expected = draw_delta0(embeds.shape, mask, init_mag, norm_type)
    assert delta.dtype == torch.float32
    assert_close(delta, expected, rtol=1e-6, atol=1e-8)
    assert torch.all(delta[~mask.bool()] == 0)
    for b in range(len(mask)):
        real = delta[b][mask[b].bool()]
        bound = init_mag / math.sqrt(int(mask[b].sum()) * emb_dim) if norm_type == "l2" else init_mag
        assert real.abs().max() <= bound * (1 + 1e-6)
        assert real.abs().max() > 0.5 * bound  # uniform over the whole range, not a tiny corner of it


def test_initial_delta_scale() -> None:
    """l2: |delta0|_F per example is init_mag * sqrt(E[u^2]) = init_mag / sqrt(3), whatever the length."""
    torch.manual_seed(0)
    init_mag, emb_dim, lengths = 0.6, 32, torch.tensor([200, 120, 60])
    mask = (torch.arange(200) < lengths.unsqueeze(1)).long()
    embeds = torch.zeros(3, 200, emb_dim)
    delta = freelb(init_mag, 0.1, 0.0, 2, "l2").initial_delta(embeds, mask)
    norms = delta.flatten(1).norm(dim=1)
    assert_close(norms, torch.full((3,), init_mag / math.sqrt(3)), rtol=0.04, atol=0)
    box = freelb(init_mag, 0.1, 0.0, 2, "linf").initial_delta(embeds, mask)
    real = box[mask.bool()]
    assert real.abs().max() <= init_mag
    assert abs(float(real.abs().mean()) - init_mag / 2) < 0.02 * init_mag  # U(-a, a): E|u| = a / 2
    assert torch.all(box[~mask.bool()] == 0)


# --- one ascent step -----------------------------------------------------------------------------------------------


def step_inputs(norm_type: str = "l2") -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    real = mask.unsqueeze(-1).float()
    delta = torch.randn(3, 6, 8, generator=generator) * 0.01 * real
    grad = torch.randn(3, 6, 8, generator=generator) * real
    return delta, grad, mask


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_unprojected_step_has_length_adv_lr(norm_type: str) -> None:
    delta, grad, mask = step_inputs()
    adv_lr = 0.1
    new = freelb(0.0, adv_lr, 0.0, 2, norm_type).ascend(delta, grad, mask)
    step = (new - delta).flatten(1)
    if norm_type == "l2":
        assert_close(step.norm(dim=1), torch.full((3,), adv_lr))
        direction = grad.flatten(1) / grad.flatten(1).norm(dim=1, keepdim=True)
    else:
        assert_close(step.abs().amax(dim=1), torch.full((3,), adv_lr))
        direction = grad.flatten(1) / grad.flatten(1).abs().amax(dim=1, keepdim=True)
    assert_close(step, adv_lr * direction)


def test_l2_projection_shrinks_only_examples_outside_the_ball() -> None:
    delta, grad, mask = step_inputs()
    real = mask.unsqueeze(-1).float()
    delta = delta.clone()
    delta[0] = 0.95 * grad[0] / grad[0].norm()  # one step of 0.2 along the gradient leaves the unit ball
    new = freelb(0.0, 0.2, 1.0, 2, "l2").ascend(delta, grad, mask)
    unprojected = delta + 0.2 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1)
    norms = new.flatten(1).norm(dim=1)
    assert torch.all(norms <= 1.0 + 1e-6)
    assert_close(norms[0], torch.tensor(1.0))
    assert_close(new[0], unprojected[0] / unprojected[0].norm())
    assert_close(new[1:], (unprojected * real)[1:])  # inside the ball: untouched
    unbounded = freelb(0.0, 0.2, 0.0, 2, "l2").ascend(delta * 100, grad, mask)
    assert_close(unbounded, delta * 100 + (unprojected - delta))  # adv_max_norm = 0: no projection at all
    assert unbounded.flatten(1).norm(dim=1)[0] > 90


def test_linf_projection_clamps_to_the_box() -> None:
    delta, grad, mask = step_inputs()
    eps = 0.05
    new = freelb(0.0, 0.08, eps, 2, "linf").ascend(delta, grad, mask)
    unprojected = delta + 0.08 * grad / grad.flatten(1).abs().amax(dim=1).view(-1, 1, 1)
    assert new.abs().max() <= eps
    inside = unprojected.abs() <= eps
    assert_close(new[inside], unprojected[inside])
    assert torch.all(new[~inside].abs() == eps)
    assert torch.any(~inside) and torch.any(inside & mask.bool().unsqueeze(-1))


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_step_keeps_padding_zero(norm_type: str) -> None:
    delta, grad, mask = step_inputs()
    pad = ~mask.bool()
    noisy_grad = grad + pad.unsqueeze(-1).float()  # a gradient that (wrongly) reaches padding
    new = freelb(0.0, 0.1, 0.0, 2, norm_type).ascend(delta, noisy_grad, mask)
    assert torch.all(new[pad] == 0)
    projected = freelb(0.0, 0.1, 0.05, 2, norm_type).ascend(delta, noisy_grad, mask)
    assert torch.all(projected[pad] == 0)


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_zero_gradient_leaves_delta_unchanged(norm_type: str) -> None:
    delta, grad, mask = step_inputs()
    grad = grad.clone()
    grad[1] = 0
    new = freelb(0.0, 0.1, 0.0, 2, norm_type).ascend(delta, grad, mask)
    assert torch.isfinite(new).all()
    assert torch.equal(new[1], delta[1])
    assert not torch.allclose(new[0], delta[0])  # the others still move
    assert torch.equal(freelb(0.0, 0.1, 0.0, 2, norm_type).ascend(delta, torch.zeros_like(grad), mask), delta)


# --- the accumulated gradient of a whole step ------------------------------------------------------------------


def test_dropout_is_active(model: TextClassifier) -> None:
    """The comparisons below only check fixed dropout masks if dropout changes the output."""
    batch = make_batch(model.config.vocab_size)
    with torch.no_grad():
        first = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        second = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert not torch.allclose(first.logits, second.logits)
    assert not torch.allclose(first.tokens, second.tokens)  # encoder dropout, not only the classifier's


@pytest.mark.parametrize(
    "hp", [SST2, YAHOO, L2_PROJECTED, LINF_PROJECTED], ids=["sst2", "zero-init", "l2-ball", "linf"]
)
def test_freelb_gradient_is_the_mean_of_the_passes(model: TextClassifier, hp: tuple) -> None:
    batch = make_batch(model.config.vocab_size)
    params = unique_parameters(model)
    zero_grads(model)
    torch.manual_seed(11)
    out = adversarial_backward(model, batch, freelb(*hp))
    expected = rederive(model, batch, hp, seed=11, params=params)
    assert_grads_equal(params, expected["grads"])
    assert set(out.losses) == {"ce"}
    assert out.losses["ce"] == pytest.approx(expected["ce"], rel=1e-5)
    assert_close(out.logits, expected["logits"], **TOL)
    if hp in (L2_PROJECTED, LINF_PROJECTED):
        assert expected["projected"]  # the case exercises the projection
    if hp is SST2:  # teeth: other dropout masks in each pass give another gradient
        other = rederive(model, batch, hp, seed=11, params=params, restore_rng=False)
        same = [torch.allclose(p.grad, other["grads"][n], **TOL) for n, p in params.items() if p.grad is not None]
        assert not all(same)
    zero_grads(model)


def test_base_is_one_plain_backward(model: TextClassifier) -> None:
    batch = make_batch(model.config.vocab_size)
    params = unique_parameters(model)
    zero_grads(model)
    torch.manual_seed(5)
    out = adversarial_backward(model, batch, None)
    torch.manual_seed(5)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = F.cross_entropy(logits, batch.labels)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    assert_grads_equal(
        params, {n: g if g is not None else torch.zeros_like(p) for (n, p), g in zip(params.items(), grads)}
    )
    assert out.losses == {"ce": pytest.approx(float(loss.detach()), rel=1e-6)}
    zero_grads(model)
    torch.manual_seed(5)
    adversarial_backward(model, batch, freelb(0.0, 0.1, 0.0, 1, "l2"))  # K = 1 from zero: no perturbation
    assert_grads_equal(
        params, {n: g if g is not None else torch.zeros_like(p) for (n, p), g in zip(params.items(), grads)}
    )
    zero_grads(model)


# --- CARL and RAR on the last pass ---------------------------------------------------------------------------


def filled_carl(dim: int, loss: str = "nce") -> CARLLoss:
    """A CARL loss over the 12 rows, banks written for every row (the same for every call)."""
    carl = CARLLoss(DATASET_LABELS, dim, negatives=3, seed=7, loss=loss)
    generator = torch.Generator().manual_seed(3)
    rows = torch.arange(len(DATASET_LABELS))
    carl.update_banks(
        rows, torch.randn(len(rows), dim, generator=generator), torch.randn(len(rows), dim, generator=generator)
    )
    return carl


@pytest.fixture(scope="module")
def bert_rar(bert: TextClassifier) -> RARObjective:
    torch.manual_seed(4)
    return RARObjective(build_reconstructor(bert, RANDOM_MINILM), weight=0.1)


@pytest.mark.parametrize("hp", [SST2, L2_PROJECTED, YAHOO], ids=["sst2", "l2-ball", "zero-init"])
def test_carl_and_rar_join_the_last_pass(bert: TextClassifier, bert_rar: RARObjective, hp: tuple) -> None:
    batch = make_batch(bert.config.vocab_size)
    dim = bert.config.hidden_size
    params = unique_parameters(bert, bert_rar)
    zero_grads(bert, bert_rar)
    carl = CARLObjective(filled_carl(dim), start_step=0, bank_start_step=0)
    torch.manual_seed(21)
    out = adversarial_backward(bert, batch, freelb(*hp), [carl, bert_rar], step=0)

    reference_carl = filled_carl(dim)  # same banks, sampler seed and Z: the black box gives the same value

    def extra(last: ClassifierOutput, clean: ClassifierOutput | None) -> Tensor:
        assert clean is not None
        l_d = reference_carl(batch.indices, batch.labels, clean.sentence, last.sentence)
        l_r = reconstruction_loss(bert_rar.reconstructor(last.tokens), batch.input_ids, batch.attention_mask)
        return l_d + 0.1 * l_r

    expected = rederive(bert, batch, hp, seed=21, params=params, extra=extra, clean_pass=True)
    assert_grads_equal(params, expected["grads"], CARL_TOL)
    assert set(out.losses) == {"ce", "carl", "rar"}
    assert out.losses["ce"] == pytest.approx(expected["ce"], rel=1e-5)
    assert out.losses["carl"] + out.losses["rar"] == pytest.approx(float(expected["extra"].detach()), rel=1e-5)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bert_rar.parameters())
    zero_grads(bert, bert_rar)


def test_carl_contributes_nothing_before_tau(bert: TextClassifier) -> None:
    batch = make_batch(bert.config.vocab_size)
    dim = bert.config.hidden_size
    params = unique_parameters(bert)
    zero_grads(bert)
    loss = filled_carl(dim)
    before = (loss.bank_orig.rows.clone(), loss.bank_adv.rows.clone())
    carl = CARLObjective(loss, start_step=5, bank_start_step=0)  # banks written, loss not yet on
    torch.manual_seed(31)
    out = adversarial_backward(bert, batch, freelb(*SST2), [carl], step=2)
    expected = rederive(bert, batch, SST2, seed=31, params=params, clean_pass=True)
    assert set(out.losses) == {"ce"}
    assert_grads_equal(params, expected["grads"])  # the clean pass leaves the adversarial passes' masks alone

    # after the step the banks hold the step's views: B[i] = normalise(M B[i] + (1 - M) normalise(R_i))
    rows = batch.indices

    def written(old: Tensor, rep: Tensor) -> Tensor:
        return F.normalize(0.5 * old + 0.5 * F.normalize(rep, dim=1), dim=1)

    assert_close(loss.bank_orig.rows[rows], written(before[0][rows], expected["clean"].sentence.detach()), **TOL)
    assert_close(loss.bank_adv.rows[rows], written(before[1][rows], expected["sentence"]), **TOL)
    untouched = torch.ones(len(DATASET_LABELS), dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(loss.bank_orig.rows[untouched], before[0][untouched])
    assert torch.equal(loss.bank_adv.rows[untouched], before[1][untouched])
    zero_grads(bert)


# --- the clean view: the first pass at zero init, no graph in the bank window -----------------------------------


def separate_clean_pass_step(
    model: TextClassifier,
    batch: Batch,
    fl: FreeLB,
    auxiliaries: list,
    step: int,
    amp_dtype: torch.dtype | None = None,
    clean_graph: bool = True,
) -> dict[str, float]:
    """The composition before the clean view was reused (commit 573fc19), kept as the reference: a separate clean
    pass, always with a graph, then the K passes; the auxiliary losses join the K-th pass's backward.
    ``clean_graph=False`` stops the gradient at the clean view (a wrong composition, for the tests' teeth)."""
    device = batch.input_ids.device
    mask = batch.attention_mask
    with torch.no_grad():
        delta = fl.initial_delta(model.embed(batch.input_ids), mask)
    rng = _RngSnapshot(device)
    clean, views, ce = None, None, torch.zeros(())
    losses: dict[str, float] = {}
    if any(aux.wants_clean_view(step) for aux in auxiliaries):
        rng.restore()
        with torch.set_grad_enabled(clean_graph), autocast_context(device, amp_dtype):
            clean = model(inputs_embeds=model.embed(batch.input_ids), attention_mask=mask)
    for t in range(fl.passes):
        rng.restore()
        delta.requires_grad_()
        with autocast_context(device, amp_dtype):
            out = model(inputs_embeds=model.embed(batch.input_ids) + delta, attention_mask=mask)
        loss = F.cross_entropy(out.logits.float(), batch.labels) / fl.passes
        ce += loss.detach()
        if t == fl.passes - 1:
            views = Views(batch=batch, adversarial=out, clean=clean)
            for aux in auxiliaries:
                with autocast_context(device, amp_dtype):
                    extra = aux.loss(views, step)
                if extra is not None:
                    loss = loss + extra
                    losses[aux.name] = float(extra.detach())
        loss.backward()
        if t < fl.passes - 1:
            delta = fl.ascend(delta, delta.grad, mask)
    assert views is not None
    for aux in auxiliaries:
        aux.after_backward(views, step)
    return {"ce": ce.item(), **losses}


class CountForwards:
    """Counts the model's forward passes during a ``with`` block."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.calls = model, 0

    def __enter__(self) -> CountForwards:
        self.handle = self.model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def carl_state(objective: CARLObjective) -> dict[str, Tensor]:
    """Banks, filled flags, Z and the sampler's RNG: everything a step writes into CARL's state."""
    state = {k: v.clone() for k, v in objective.contrast.state_dict().items() if isinstance(v, Tensor)}
    return state | {"sampler_rng": objective.contrast.sampler.generator.get_state()}


def one_step(
    composition: Callable[..., object],
    model: TextClassifier,
    batch: Batch,
    hp: tuple,
    auxiliaries: list,
    step: int,
    params: dict[str, nn.Parameter],
    amp_dtype: torch.dtype | None = None,
) -> dict:
    """One step from a fixed seed: the parameter gradients, loss values, CARL state, RNG after it, passes run."""
    zero_grads(*[m for m in [model, *auxiliaries] if isinstance(m, nn.Module)])
    torch.manual_seed(41)
    with CountForwards(model) as counter:
        out = composition(model, batch, freelb(*hp), auxiliaries, step, amp_dtype=amp_dtype)
    losses = out.losses if hasattr(out, "losses") else out
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
    carl = next(a for a in auxiliaries if isinstance(a, CARLObjective))
    return {
        "grads": grads,
        "losses": losses,
        "carl": carl_state(carl),
        "rng": torch.get_rng_state(),
        "forwards": counter.calls,
    }


def objectives(model: TextClassifier, rar: RARObjective | None, loss: str, tau: int) -> list:
    carl = CARLObjective(filled_carl(model.config.hidden_size, loss), start_step=tau, bank_start_step=0)
    return [carl] if rar is None else [carl, rar]


def relative_difference(got: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """|got - expected| / |expected| over all parameters together (Frobenius norms)."""
    num = sum(float((got[n] - expected[n]).double().norm() ** 2) for n in expected)
    den = sum(float(expected[n].double().norm() ** 2) for n in expected)
    return math.sqrt(num / den)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["carl", "carl_rar"])
@pytest.mark.parametrize("loss", ["nce", "infonce"])
def test_zero_init_reuses_the_first_pass_with_the_same_gradients(
    bert: TextClassifier, bert_rar: RARObjective, loss: str, method: str, amp: torch.dtype | None
) -> None:
    """init_mag = 0 (Yahoo!/AG's News, K = 3): pass 1 is the clean view; L_D and pass 1's CE join the last
    backward. Parameter gradients, loss values, the banks and the RNG after the step equal the separate clean pass's.

    bf16 rounds every activation and gradient to 8 mantissa bits, and the reused pass sums its two gradients
    (CE and L_D) before that rounding, the separate pass after it; so under bf16 the reused composition must be as
    close to the fp32 gradient as the separate pass is (measured: 1.69e-2 and 1.74e-2 relative for NCE).
    """
    batch = make_batch(bert.config.vocab_size)
    rar = bert_rar if method == "carl_rar" else None
    params = unique_parameters(bert, *([rar] if rar else []))

    def run(composition: Callable[..., object], dtype: torch.dtype | None = amp) -> dict:
        return one_step(composition, bert, batch, YAHOO, objectives(bert, rar, loss, 0), 0, params, dtype)

    new, ref = run(adversarial_backward), run(separate_clean_pass_step)
    assert (new["forwards"], ref["forwards"]) == (3, 4)  # the extra clean pass is gone
    assert set(new["losses"]) == {"ce", *ref["losses"]} and "carl" in ref["losses"]
    for key, value in ref["losses"].items():
        assert new["losses"][key] == pytest.approx(value, rel=1e-5), key
    noise = relative_difference(new["grads"], ref["grads"])
    if amp is None:
        assert_grads_equal(params, ref["grads"], CARL_TOL)
    else:
        exact = run(separate_clean_pass_step, None)["grads"]
        assert relative_difference(new["grads"], exact) < 1.1 * relative_difference(ref["grads"], exact) + 1e-4
        assert noise < 2e-2
    assert torch.equal(new["carl"]["bank_orig.rows"], ref["carl"]["bank_orig.rows"])  # pass 1 = the clean pass
    assert_close(new["carl"]["bank_adv.rows"], ref["carl"]["bank_adv.rows"], **TOL)
    for key in ("z_a", "z_o"):
        assert_close(new["carl"][key], ref["carl"][key], rtol=1e-5, atol=0)
    assert torch.equal(new["carl"]["sampler_rng"], ref["carl"]["sampler_rng"])
    assert torch.equal(new["rng"], ref["rng"])  # the next step draws the same delta0 and dropout masks
    # teeth: stopping L_D's gradient at the clean view (the path pass 1's kept graph carries) is far outside
    wrong = run(functools.partial(separate_clean_pass_step, clean_graph=False))
    assert relative_difference(wrong["grads"], ref["grads"]) > 10 * noise
    zero_grads(bert, *([rar] if rar else []))


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hp", [SST2, YAHOO], ids=["sst2", "zero-init"])
def test_bank_window_writes_the_same_banks_without_a_clean_graph(
    bert: TextClassifier, bert_rar: RARObjective, hp: tuple, amp: torch.dtype | None
) -> None:
    """Before tau the clean view only feeds the banks: computed under no_grad (SST-2) or taken from pass 1
    (zero init), it leaves banks, parameter gradients and the RNG bit for bit as the separate clean pass did."""
    batch = make_batch(bert.config.vocab_size)
    params = unique_parameters(bert, bert_rar)
    seen: list[ClassifierOutput] = []
    carl, _ = auxiliaries = objectives(bert, bert_rar, "nce", tau=5)
    carl.after_backward = lambda views, step, real=carl.after_backward: (seen.append(views.clean), real(views, step))
    new = one_step(adversarial_backward, bert, batch, hp, auxiliaries, 2, params, amp)
    ref = one_step(separate_clean_pass_step, bert, batch, hp, objectives(bert, bert_rar, "nce", tau=5), 2, params, amp)

    k = hp[3]
    assert (new["forwards"], ref["forwards"]) == (k + 1 if hp[0] > 0 else k, k + 1)
    assert not seen[0].sentence.requires_grad and seen[0].sentence.grad_fn is None  # no graph was built
    assert set(new["losses"]) == {"ce", "rar"} and new["losses"] == ref["losses"]
    for name in params:
        assert torch.equal(new["grads"][name], ref["grads"][name]), name
    assert new["carl"].keys() == ref["carl"].keys()
    for key in new["carl"]:
        assert torch.equal(new["carl"][key], ref["carl"][key]), key
    assert torch.equal(new["rng"], ref["rng"])
    zero_grads(bert, bert_rar)


class CleanSimilarity:
    """A user's auxiliary loss with no ``clean_view_needs_grad``: it must get a clean view with a graph."""

    name = "similar"

    def wants_clean_view(self, step: int) -> bool:
        return True

    def loss(self, views: Views, step: int) -> Tensor:
        return (views.clean.sentence - views.adversarial.sentence.detach()).pow(2).mean()

    def after_backward(self, views: Views, step: int) -> None:
        return None


@pytest.mark.parametrize("hp", [SST2, YAHOO], ids=["sst2", "zero-init"])
def test_an_auxiliary_without_clean_view_needs_grad_gets_a_graph(bert: TextClassifier, hp: tuple) -> None:
    batch = make_batch(bert.config.vocab_size)
    params = unique_parameters(bert)
    results = []
    for composition in (adversarial_backward, separate_clean_pass_step):
        zero_grads(bert)
        torch.manual_seed(43)
        composition(bert, batch, freelb(*hp), [CleanSimilarity()], 0)
        results.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()})
    for name in params:
        assert_close(results[0][name], results[1][name], **TOL, msg=lambda m, name=name: f"{name}: {m}")
    zero_grads(bert)
