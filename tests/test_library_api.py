"""The README's "use it in your own training loop" example, run as written on a tiny model."""

from __future__ import annotations

import torch
from helpers.models import TINY_BERT

import carlrar


def test_readme_loop_trains_with_freelb_carl_and_rar() -> None:
    torch.manual_seed(0)
    # --- as in README.md "Use the library in your own loop" ---
    model, tokenizer = carlrar.load_model("random:minilm-l6", num_labels=2, overrides=TINY_BERT)
    texts = ["a good film", "a bad film", "good acting", "bad plot", "so good", "so bad"] * 2
    train_labels = torch.tensor([1, 0] * 6)
    freelb = carlrar.FreeLB(carlrar.FreeLBConfig(init_mag=0.6, adv_lr=0.1, adv_max_norm=0.0, adv_steps=2))
    carl = carlrar.CARLObjective(
        carlrar.CARLLoss(train_labels, model.config.hidden_size, negatives=4), start_step=3, bank_start_step=0
    )
    rar = carlrar.RARObjective(carlrar.build_reconstructor(model, "random:minilm-l6"), weight=0.1)
    params = carlrar.parameters_of(model, [carl, rar])
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(6):
        rows = torch.arange(6) + 6 * (step % 2)  # two batches per epoch: every bank row is written by step 3
        encoded = tokenizer([texts[i] for i in rows], padding=True, return_tensors="pt")
        batch = carlrar.Batch(encoded["input_ids"], encoded["attention_mask"], train_labels[rows], rows)
        out = carlrar.adversarial_backward(model, batch, freelb, [carl, rar], step)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.losses)
    # --- end of example ---
    assert "carl" not in losses[2] and "carl" in losses[3], "CARL's loss starts at step tau = 3"
    assert all("rar" in entry for entry in losses)
    assert len(params) == len({id(p) for p in params})
    assert carl.contrast.bank_orig.is_full()
