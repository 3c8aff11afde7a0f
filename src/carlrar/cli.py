"""The ``carlrar`` command: each subcommand is one workflow step, usable on its own."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from carlrar.errors import CarlrarError


def _cmd_prepare(args: argparse.Namespace) -> None:
    from carlrar.config import load_config
    from carlrar.data import prepare_dataset

    config = load_config(args.config)
    raw_dir = args.raw_dir or config.raw_dir
    manifest = prepare_dataset(config, args.dataset, raw_dir, args.out)
    counts = ", ".join(f"{split} {info['rows']:,}" for split, info in manifest["splits"].items())
    logging.info("%s: %s -> %s (evaluated on %s)", args.dataset, counts, args.out, manifest["evaluation_split"])


def _cmd_train(args: argparse.Namespace) -> None:
    from carlrar.config import load_config
    from carlrar.training import train

    result = train(load_config(args.config), args.dataset, args.method, args.seed, args.data, args.out, args.device)
    m = result.metrics
    test = "n/a" if m["test_accuracy"] is None else f"{m['test_accuracy']:.4f}"
    logging.info("%s/%s/seed%d: dev %.4f, test %s, %d steps in %.0f s -> %s",
                 args.dataset, args.method, args.seed, m["dev_accuracy"], test, m["steps"], m["train_seconds"], args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carlrar",
        description="CARL and RAR adversarial training for text classifiers: data, training, attacks, tables.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = commands.add_parser(
        "prepare",
        help="sample a dataset's train/dev/test splits (paper Table 9) into parquet files with a manifest",
        description=(
            "Read the raw files in RAW_DIR/NAME/ (official formats or a 'label,text' CSV), or the Hugging Face "
            "hub when they are absent, and write OUT/{train,dev,test}.parquet and OUT/manifest.json. The sample "
            "depends only on the config's data seed and sizes; OUT is replaced atomically."
        ),
    )
    prepare.add_argument("--config", required=True, type=Path, help="YAML config (e.g. config/config.yaml)")
    prepare.add_argument("--dataset", required=True, choices=["sst2", "ag_news", "yelp_polarity", "yahoo_answers"])
    prepare.add_argument("--raw-dir", type=Path, help="folder of raw datasets (default: the config's raw_dir)")
    prepare.add_argument("--out", required=True, type=Path, help="output folder, e.g. data/processed/sst2")
    prepare.set_defaults(run=_cmd_prepare)

    train = commands.add_parser(
        "train",
        help="train one (dataset, method, seed) run; restarting the same command resumes it",
        description=(
            "Fine-tune the config's model on DATA (a 'carlrar prepare' folder) with METHOD and write OUT/metrics.json, "
            "OUT/best/ (weights with the best dev accuracy, config and tokenizer) and OUT/checkpoint/ (resumable state). "
            "On CUDA it leases a free visible GPU (lock files in $CARLRAR_GPU_LOCK_DIR) and uses bf16 autocast."
        ),
    )
    train.add_argument("--config", required=True, type=Path, help="YAML config (e.g. config/config.yaml)")
    train.add_argument("--dataset", required=True, choices=["sst2", "ag_news", "yelp_polarity", "yahoo_answers"])
    train.add_argument("--method", required=True, choices=["base", "freelb", "carl", "rar", "carl_rar"])
    train.add_argument("--seed", required=True, type=int, help="training seed (model init, order, dropout, negatives)")
    train.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    train.add_argument("--out", required=True, type=Path, help="run folder")
    train.add_argument("--device", default="auto", help="auto (a free GPU, else CPU), cpu, cuda or cuda:N")
    train.set_defaults(run=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.run(args)
    except CarlrarError as exc:
        print(f"carlrar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"carlrar {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
