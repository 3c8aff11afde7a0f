"""Data-parallel training with 2 CPU processes (gloo): banks, sampler and gradients agree across ranks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml
from helpers.configs import tiny_config

from carlrar.contrastive import CARLLoss

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import save_file
    from carlrar.contrastive import CARLLoss
    from carlrar.distributed import init_collective

    out = sys.argv[1]
    collective, device = init_collective("cpu")
    rank = collective.rank
    labels = torch.arange(40) % 3
    carl = CARLLoss(labels, dim=8, negatives=6, seed=5, collective=collective)
    # each rank holds its share of two global batches of 10 rows; batch sizes differ between ranks
    for step, rows in enumerate([torch.arange(0, 40, 2), torch.arange(1, 40, 2)]):
        local = rows.tensor_split(2)[rank] if step == 0 else rows[:7] if rank == 0 else rows[7:]
        features = torch.randn(40, 8, generator=torch.Generator().manual_seed(step))
        carl.update_banks(local, features[local], features[local] * 2)
    local = torch.tensor([0, 1, 2, 3]) if rank == 0 else torch.tensor([4, 5])
    clean = torch.randn(40, 8, generator=torch.Generator().manual_seed(9))[local].requires_grad_()
    loss = carl(local, labels[local], clean, clean.detach() + 0.1)
    # gradient averaging: rank r's gradient is r + 1 on 2 + 2 r examples -> weighted mean (1*2 + 2*4) / 6
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.full((3,), float(rank + 1))
    collective.reduce_gradients([param], 2 + 2 * rank)
    save_file({k: v.contiguous() for k, v in carl.state_dict().items() if isinstance(v, torch.Tensor)},
              f"{out}/rank{rank}.safetensors")
    json.dump({"loss": loss.item(), "grad": param.grad.tolist(),
               "sampler": carl.sampler.generator.get_state().tolist()}, open(f"{out}/rank{rank}.json", "w"))
    collective.close()
    """
)


def torchrun(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_banks_sampler_and_gradients_agree_across_ranks(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    result = torchrun(tmp_path, str(script), str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    states = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    outputs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"{key} differs between ranks"
    assert outputs[0]["sampler"] == outputs[1]["sampler"], "the sampler RNGs diverged"
    assert outputs[0]["grad"] == outputs[1]["grad"]
    assert outputs[0]["grad"] == [torch.tensor(10 / 6).item()] * 3

    # the banks equal a single process writing the whole global batches
    single = CARLLoss(torch.arange(40) % 3, dim=8, negatives=6, seed=5)
    for step, rows in enumerate([torch.arange(0, 40, 2), torch.arange(1, 40, 2)]):
        features = torch.randn(40, 8, generator=torch.Generator().manual_seed(step))
        single.update_banks(rows, features[rows], features[rows] * 2)
    for name in ("bank_orig.rows", "bank_adv.rows", "bank_orig.filled"):
        assert torch.equal(single.state_dict()[name], states[0][name]), name


def test_torchrun_trains_with_two_cpu_ranks(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m carlrar.cli train` on a tiny CARL run: rank 0 writes one finished run."""
    raw = tmp_path / "raw" / "sst2"
    raw.mkdir(parents=True)
    rows = [f"a {'good' if i % 2 else 'bad'} film number {i} \t{i % 2}" for i in range(24)]
    (raw / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (raw / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:8]) + "\n")
    # the tiny config with smoke.yaml's CARL schedule (from epoch 2, 4 negatives), data seed 1, a learning rate
    # of 1e-3, and the schema's run name and evaluation batch size
    carl = {"start_epoch": 2, "negatives": 4}
    changes = {"run_name": "run", "data": {"seed": 1}, "datasets": {"sst2": {"carl": carl}}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(changes, learning_rate=1e-3, eval_batch_size=128)))
    from carlrar.cli import main

    assert (
        main(
            [
                "prepare",
                "--config",
                str(config),
                "--dataset",
                "sst2",
                "--raw-dir",
                str(tmp_path / "raw"),
                "--out",
                str(tmp_path / "data"),
            ]
        )
        == 0
    )
    result = torchrun(
        tmp_path,
        "-m",
        "carlrar.cli",
        "train",
        "--config",
        str(config),
        "--dataset",
        "sst2",
        "--method",
        "carl",
        "--seed",
        "1",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 9 and len(metrics["history"]) == 3
    state = json.loads((tmp_path / "run/checkpoint/state.json").read_text())
    assert state["progress"]["step"] == 9
