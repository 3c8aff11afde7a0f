"""Tests for carlrar.contrastive: each loss against a plain per-example computation, the samplers' contract,
the memory-bank rule (Eq. 5), resumability, gradients and precision."""

from __future__ import annotations

import io
import math

import pytest
import torch

from carlrar.contrastive import (
    CARLLoss,
    ClassAwareNegativeSampler,
    MemoryBank,
    infonce_loss,
    nce_loss,
    sample_negatives_per_example,
)

T = 0.07
N, DIM, M_NEG = 30, 8, 5
LABELS = torch.arange(N) % 3  # 10 rows per class, 20 of other labels
BATCH_IDX = torch.tensor([0, 4, 7, 11, 13, 20, 29])  # all three classes, uneven counts


# ---------------------------------------------------------------- plain references (python loops, float64)


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def score(a: list[float], b: list[float]) -> float:
    a, b = unit(a), unit(b)
    return math.exp(sum(x * y for x, y in zip(a, b)) / T)


def direction_scores(anchors, positives, bank, neg_sets):
    """Per anchor i: (h(anchor_i, positive_i), [h(anchor_i, bank[j]) for j in its negatives])."""
    out = []
    for i in range(len(anchors)):
        h_pos = score(anchors[i], positives[i])
        h_neg = [score(anchors[i], bank[j]) for j in neg_sets[i]]
        out.append((h_pos, h_neg))
    return out


def brute_infonce(scores) -> float:
    total = 0.0
    for h_pos, h_neg in scores:
        total += -math.log(h_pos / (h_pos + sum(h_neg)))
    return total / len(scores)


def brute_z(scores, n_rows: int) -> float:
    values = []
    for h_pos, h_neg in scores:
        values.append(h_pos)
        values.extend(h_neg)
    return sum(values) / len(values) * n_rows


def brute_nce(scores, z: float, n_rows: int) -> float:
    total = 0.0
    for h_pos, h_neg in scores:
        m = len(h_neg)
        pn = 1.0 / n_rows
        p_pos = h_pos / z
        total += math.log(p_pos / (p_pos + m * pn + 1e-7))
        for h in h_neg:
            total += math.log(m * pn / (h / z + m * pn + 1e-7))
    return -total / len(scores)


# ---------------------------------------------------------------- helpers


def filled_carl(loss: str = "nce", seed: int = 0) -> CARLLoss:
    carl = CARLLoss(LABELS, DIM, M_NEG, temperature=T, loss=loss, seed=seed)
    g = torch.Generator().manual_seed(123)
    for rows in torch.arange(N).split(7):
        carl.update_banks(rows, torch.randn(len(rows), DIM, generator=g), torch.randn(len(rows), DIM, generator=g))
    return carl


def upcoming_negatives(carl: CARLLoss, batch_labels: torch.Tensor) -> list[list[int]]:
    """The per-anchor negative sets the next forward will draw, via a sampler restored from carl's state."""
    twin = ClassAwareNegativeSampler(LABELS, M_NEG, seed=999)
    twin.load_state_dict(carl.sampler.state_dict())
    draws = twin.draw(batch_labels)
    return [draws[y].tolist() for y in batch_labels.tolist()]


def views(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(len(BATCH_IDX), DIM, generator=g).to(dtype).requires_grad_()
    adv = (clean.detach().float() + torch.randn(len(BATCH_IDX), DIM, generator=g)).to(dtype).requires_grad_()
    return clean, adv


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("form", ["nce", "infonce"])
def test_carl_loss_matches_per_example_brute_force_over_two_steps(form: str) -> None:
    carl = filled_carl(form)
    labels = LABELS[BATCH_IDX]
    bank_orig = carl.bank_orig.rows.tolist()
    bank_adv = carl.bank_adv.rows.tolist()
    z_a = z_o = None
    for step in range(2):  # the second step exercises the running Z
        clean, adv = views(step)
        neg_sets = upcoming_negatives(carl, labels)
        got = carl(BATCH_IDX, labels, clean, adv)
        c, a = clean.tolist(), adv.tolist()
        s_a = direction_scores(a, c, bank_orig, neg_sets)  # L_D^a: anchor R_adv, negatives from B_orig
        s_o = direction_scores(c, a, bank_adv, neg_sets)  # L_D^o: anchor R, negatives from B_adv
        if form == "infonce":
            want = brute_infonce(s_a) + brute_infonce(s_o)
        else:
            za_batch, zo_batch = brute_z(s_a, N), brute_z(s_o, N)
            z_a = za_batch if z_a is None else 0.99 * z_a + 0.01 * za_batch
            z_o = zo_batch if z_o is None else 0.99 * z_o + 0.01 * zo_batch
            want = brute_nce(s_a, z_a, N) + brute_nce(s_o, z_o, N)
            assert carl.z_a.item() == pytest.approx(z_a, rel=1e-5)
            assert carl.z_o.item() == pytest.approx(z_o, rel=1e-5)
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_loss_functions_match_brute_force_on_given_logits() -> None:
    g = torch.Generator().manual_seed(0)
    pos, neg = 3 * torch.randn(4, generator=g), 3 * torch.randn(4, 6, generator=g)
    scores = [(math.exp(p), [math.exp(x) for x in row]) for p, row in zip(pos.tolist(), neg.tolist())]
    assert infonce_loss(pos, neg).item() == pytest.approx(brute_infonce(scores), rel=1e-5)
    assert nce_loss(pos, neg, 55.0, 50).item() == pytest.approx(brute_nce(scores, 55.0, 50), rel=1e-5)


def test_eval_mode_uses_but_does_not_update_z() -> None:
    carl = filled_carl("nce")
    labels = LABELS[BATCH_IDX]
    carl(BATCH_IDX, labels, *views(0))
    z = carl.z_a.clone()
    carl.eval()
    carl(BATCH_IDX, labels, *views(1))
    assert torch.equal(carl.z_a, z)


def test_invalid_loss_name_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match="nce.*infonce"):
        CARLLoss(LABELS, DIM, M_NEG, loss="triplet")


def test_forward_refuses_unfilled_banks_and_wrong_labels() -> None:
    carl = CARLLoss(LABELS, DIM, M_NEG)
    with pytest.raises(RuntimeError, match="memory-bank"):
        carl(BATCH_IDX, LABELS[BATCH_IDX], *views())
    carl = filled_carl()
    with pytest.raises(ValueError, match="labels"):
        carl(BATCH_IDX, (LABELS[BATCH_IDX] + 1) % 3, *views())


# ---------------------------------------------------------------- samplers


def check_negative_sets(anchor_labels: list[int], neg_sets: list[list[int]]) -> None:
    assert len(neg_sets) == len(anchor_labels)
    for y, negs in zip(anchor_labels, neg_sets):
        assert len(negs) == M_NEG
        assert len(set(negs)) == M_NEG
        assert all(LABELS[j].item() != y for j in negs)


def test_class_aware_sampler_contract() -> None:
    sampler = ClassAwareNegativeSampler(LABELS, M_NEG, seed=1)
    labels = LABELS[BATCH_IDX]
    draws = sampler.draw(labels)
    assert sorted(draws) == [0, 1, 2]
    check_negative_sets(labels.tolist(), [draws[y].tolist() for y in labels.tolist()])


def test_per_example_reference_sampler_contract() -> None:
    labels = LABELS[BATCH_IDX]
    negs = sample_negatives_per_example(LABELS, labels, M_NEG, torch.Generator().manual_seed(1))
    assert negs.shape == (len(BATCH_IDX), M_NEG)
    check_negative_sets(labels.tolist(), negs.tolist())


def test_both_samplers_draw_every_other_label_row_uniformly() -> None:
    sampler = ClassAwareNegativeSampler(LABELS, M_NEG, seed=2)
    gen = torch.Generator().manual_seed(2)
    anchor = torch.tensor([0])
    class_aware = torch.zeros(N)
    per_example = torch.zeros(N)
    draws = 3000
    for _ in range(draws):
        class_aware[sampler.draw(anchor)[0]] += 1
        per_example[sample_negatives_per_example(LABELS, anchor, M_NEG, gen)[0]] += 1
    expected = draws * M_NEG / 20  # 20 rows have another label than class 0
    for counts in (class_aware, per_example):
        assert counts[LABELS == 0].sum() == 0
        assert torch.allclose(counts[LABELS != 0], torch.full((20,), expected), rtol=0.15)


def test_too_small_class_fails_at_construction_naming_the_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 3)  # class 0 has only 3 rows of another label
    with pytest.raises(ValueError, match=r"class 0: m=4 .* only 3"):
        ClassAwareNegativeSampler(labels, 4)
    with pytest.raises(ValueError, match=r"class 0"):
        CARLLoss(labels, DIM, 4)
    with pytest.raises(ValueError, match=r"class 0"):
        sample_negatives_per_example(labels, torch.tensor([1]), 4, torch.Generator())


# ---------------------------------------------------------------- memory bank


def test_bank_first_write_copies_then_follows_eq5() -> None:
    bank = MemoryBank(4, 3, momentum=0.5)
    first = torch.tensor([[3.0, 0.0, 4.0], [0.0, 2.0, 0.0]])
    bank.update(torch.tensor([1, 2]), first)
    assert torch.allclose(bank.rows[1], torch.tensor([0.6, 0.0, 0.8]))
    assert torch.allclose(bank.rows[2], torch.tensor([0.0, 1.0, 0.0]))
    assert not bank.is_full()

    second = torch.tensor([[0.0, 5.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, -7.0]])
    bank.update(torch.tensor([1, 0, 3]), second)
    mixed = [0.5 * 0.6 + 0.5 * 0.0, 0.5 * 0.0 + 0.5 * 1.0, 0.5 * 0.8 + 0.5 * 0.0]
    assert bank.rows[1].tolist() == pytest.approx(unit(mixed), rel=1e-6)
    assert bank.rows[0].tolist() == pytest.approx(unit([1.0, 1.0, 1.0]), rel=1e-6)  # first write of row 0
    assert bank.is_full()
    assert torch.allclose(bank.rows.norm(dim=1), torch.ones(4))


def test_bank_stores_detached_fp32_and_rejects_duplicate_indices() -> None:
    bank = MemoryBank(3, 2)
    feats = torch.randn(2, 2, dtype=torch.bfloat16, requires_grad=True)
    bank.update(torch.tensor([0, 2]), feats)
    assert bank.rows.dtype == torch.float32 and not bank.rows.requires_grad
    with pytest.raises(ValueError, match="duplicate"):
        bank.update(torch.tensor([1, 1]), torch.randn(2, 2))


# ---------------------------------------------------------------- state, gradients, precision


def test_state_dict_round_trip_gives_identical_next_draws_and_losses() -> None:
    carl = filled_carl("nce", seed=5)
    labels = LABELS[BATCH_IDX]
    carl(BATCH_IDX, labels, *views(0))  # sets Z and advances the sampler
    buffer = io.BytesIO()
    torch.save(carl.state_dict(), buffer)
    buffer.seek(0)
    resumed = CARLLoss(LABELS, DIM, M_NEG, loss="nce", seed=77)
    resumed.load_state_dict(torch.load(buffer))
    for key in ("bank_orig.rows", "bank_adv.filled", "z_a", "z_o"):
        assert torch.equal(resumed.state_dict()[key], carl.state_dict()[key])
    assert upcoming_negatives(resumed, labels) == upcoming_negatives(carl, labels)
    for step in (1, 2):
        assert torch.equal(resumed(BATCH_IDX, labels, *views(step)), carl(BATCH_IDX, labels, *views(step)))


def test_loading_state_for_other_labels_is_refused() -> None:
    state = filled_carl().state_dict()
    with pytest.raises(ValueError, match="different training labels"):
        CARLLoss(LABELS.flip(0), DIM, M_NEG).load_state_dict(state)


def test_gradients_reach_both_live_views_but_not_the_banks() -> None:
    carl = filled_carl()
    before = {k: v.clone() for k, v in carl.state_dict().items() if k.startswith("bank")}
    clean, adv = views()
    carl(BATCH_IDX, LABELS[BATCH_IDX], clean, adv).backward()
    for view in (clean, adv):
        assert view.grad is not None and view.grad.abs().sum() > 0
    for bank in (carl.bank_orig, carl.bank_adv):
        assert not bank.rows.requires_grad and bank.rows.grad is None
    for key, value in before.items():  # forward leaves the banks to update_banks
        assert torch.equal(carl.state_dict()[key], value)


def test_bf16_inputs_and_autocast_still_give_the_fp32_loss() -> None:
    labels = LABELS[BATCH_IDX]
    clean, adv = views(dtype=torch.bfloat16)
    loss = filled_carl("infonce")(BATCH_IDX, labels, clean, adv)
    reference = filled_carl("infonce")(BATCH_IDX, labels, clean.detach().float(), adv.detach().float())
    assert loss.dtype == torch.float32
    assert torch.equal(loss, reference)
    loss.backward()
    assert clean.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = filled_carl("infonce")(BATCH_IDX, labels, clean.detach().float(), adv.detach().float())
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, reference)
