"""The ``carlrar`` command: each subcommand is one workflow step, usable on its own."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from carlrar.config import AnalysisConfig, bound_problem
from carlrar.errors import CarlrarError
from carlrar.host_memory import keep_host_memory
from carlrar.registry import DATASET_IDS, METHOD_IDS

# One help text for every --device option. The variables are those of carlrar.devices, written out here because
# importing that module would load torch for every command, even --help.
DEVICE_HELP = (
    "auto (a free GPU slot, else the CPU), cpu, cuda or cuda:N; CARLRAR_GPU_SLOTS=N lets N runs share a GPU "
    "(default 1), CARLRAR_GPU_LEASE=off skips the GPU lock, on shares it across SLURM jobs (auto: a SLURM job's "
    "jobs take turns on its GPUs, other jobs' locks do not count)"
)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) like every other carlrar error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def config_number(key: str, kind: type[int] | type[float] = float) -> Callable[[str], int | float]:
    """An argparse type for an option mirroring config key ``key``: the same type and bounds as the schema's."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        problem = bound_problem(key, value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text} {'is ' if problem.startswith('not') else ''}{problem}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its messages
    return parse


def one_line(message: str) -> str:
    """A message as one line: wrapped texts from libraries must not break the one-line error rule."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def positive_int(text: str) -> int:
    """An argparse type for counts that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def resample_count(text: str) -> int:
    """The argparse type of ``paired-table --resamples``: 1 to carlrar.paired.MAX_RESAMPLES, before any work."""
    from carlrar.paired import MAX_RESAMPLES  # numpy and pandas: imported only when the option is given

    value = positive_int(text)
    if value > MAX_RESAMPLES:
        raise argparse.ArgumentTypeError(f"{text} must be <= {MAX_RESAMPLES} (the replicates are held in memory)")
    return value


def _cmd_prepare(args: argparse.Namespace) -> None:
    from carlrar.config import load_config
    from carlrar.data import prepare_dataset

    config = load_config(args.config, args.set)
    raw_dir = args.raw_dir or config.raw_dir
    manifest = prepare_dataset(config, args.dataset, raw_dir, args.out)
    counts = ", ".join(f"{split} {info['rows']:,}" for split, info in manifest["splits"].items())
    logging.info("%s: %s -> %s (evaluated on %s)", args.dataset, counts, args.out, manifest["evaluation_split"])


def _cmd_train(args: argparse.Namespace) -> None:
    from carlrar.config import load_config
    from carlrar.training import train

    config = load_config(args.config, args.set)
    result = train(
        config, args.dataset, args.method, args.seed, args.data, args.out, args.device, args.rar_warmup, args.restart
    )
    m = result.metrics
    if not m:  # a non-zero rank of a torchrun job: rank 0 reports
        return
    test = "n/a" if m["test_accuracy"] is None else f"{m['test_accuracy']:.4f}"
    logging.info(
        "%s/%s/seed%d: dev %.4f, test %s, %d steps in %.0f s -> %s",
        args.dataset,
        args.method,
        args.seed,
        m["dev_accuracy"],
        test,
        m["steps"],
        m["train_seconds"],
        args.out,
    )


def _cmd_rar_warmup(args: argparse.Namespace) -> None:
    from carlrar.config import load_config
    from carlrar.rar_warmup import warm_up_reconstructor

    config = load_config(args.config, args.set)
    if not config.rar.warmup_steps:
        logging.warning("training.rar.warmup_steps is 0: the folder holds the untouched head")
    warm_up_reconstructor(config, args.dataset, args.data, args.out, args.device)


def _cmd_table2(args: argparse.Namespace) -> None:
    from carlrar.reporting import write_table2

    frame = write_table2(args.metrics, args.out)
    logging.info("Table 2: %d rows from %d metrics files -> %s.{md,csv,tex}", len(frame), len(args.metrics), args.out)


def _analysis_settings(args: argparse.Namespace) -> AnalysisConfig:
    """The attack's settings: ``--config``'s ``analysis`` section (else the schema's defaults), then the flags.

    The workflow passes its resolved config, so a setting lives in one place, the config; a flag given by hand
    replaces just that value (flags are parsed to None when absent, so a default can never mask the config).
    """
    from carlrar.config import length_problem, load_config

    epsilons = getattr(args, "epsilons", None)
    if epsilons is not None and (problem := length_problem("analysis.epsilons", len(epsilons))):
        raise CarlrarError(f"--epsilons: {problem}")
    analysis = load_config(args.config).analysis if args.config else AnalysisConfig.defaults()
    given = {
        name: tuple(value) if isinstance(value, list) else value
        for name in (f.name for f in dataclasses.fields(AnalysisConfig))
        if (value := getattr(args, name, None)) is not None
    }
    return dataclasses.replace(analysis, **given)


def _cmd_attack(args: argparse.Namespace) -> None:
    from carlrar.attacks import attack_split

    settings = _analysis_settings(args)
    # attack_split logs each epsilon's accuracy under attack, success rate and representation distances.
    attack_split(
        args.run_dir,
        args.data,
        args.out,
        epsilons=settings.epsilons,
        steps=settings.steps,
        step_size_ratio=settings.step_size_ratio,
        batch_size=settings.batch_size,
        device=args.device,
        seed=settings.seed,
    )
    logging.info("records_eps*.parquet and summary.json -> %s", args.out)


def _cmd_samples(args: argparse.Namespace) -> None:
    from carlrar.attacks import text_samples

    settings = _analysis_settings(args)
    report = text_samples(
        args.run_dir,
        args.base_run,
        args.data,
        args.out,
        epsilon=settings.samples_epsilon,
        steps=settings.steps,
        step_size_ratio=settings.step_size_ratio,
        batch_size=settings.batch_size,
        device=args.device,
        seed=settings.seed,
    )
    logging.info(
        "%d of %d decoded sentences differ from the original; %d fool the base model -> %s",
        report["n_changed"],
        report["n_examples"],
        report["n_fool_base"],
        args.out,
    )


def _add_attack_parsers(commands: argparse._SubParsersAction) -> None:
    """``attack`` (Tables 4 and 5) and ``samples`` (Table 6): settings from --config's analysis section, or flags."""
    defaults = AnalysisConfig.defaults()  # shown in the help texts; read from the schema, never written here

    def setting(key: str, what: str) -> str:
        """The help text of a flag mirroring analysis.KEY: where its value comes from when the flag is absent."""
        value = getattr(defaults, key)
        shown = " ".join(
            f"{v:g}" if isinstance(v, float) else str(v) for v in (value if isinstance(value, tuple) else (value,))
        )
        return f"{what} (default: analysis.{key} of --config; without --config the schema's {shown})"

    def config_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            type=Path,
            help="YAML config whose analysis section gives the settings (the workflow passes its resolved "
            "results/<run_name>/config.yaml); each setting flag replaces one value. Without it: the schema's "
            "defaults (config/README.md)",
        )

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--steps", type=config_number("analysis.steps", int), help=setting("steps", "k, the number of PGD steps")
        )
        sub.add_argument(
            "--step-size-ratio",
            type=config_number("analysis.step_size_ratio"),
            help=setting("step_size_ratio", "step size alpha as a fraction of epsilon"),
        )
        sub.add_argument(
            "--batch-size",
            type=config_number("analysis.batch_size", int),
            help=setting("batch_size", "examples per attacked batch"),
        )
        sub.add_argument("--device", default="auto", help=DEVICE_HELP)
        sub.add_argument(
            "--seed", type=config_number("analysis.seed", int), help=setting("seed", "seed of the random starts")
        )

    attack = commands.add_parser(
        "attack",
        help="k-PGD attack on the word embeddings of a trained run (paper Tables 4 and 5)",
        description=(
            "Attack RUN's best model on DATA's evaluated split (the manifest's evaluation_split) with l2 k-PGD on "
            "the raw word embeddings: random start in the epsilon ball, K steps of size alpha along g/||g||, "
            "projection per example; eval mode, parameters frozen. The settings (epsilons, steps, step size ratio, "
            "batch size, seed) are the analysis section of --config, or the schema's defaults without it; each "
            "flag replaces one. Writes OUT/records_eps{EPS}.parquet (per "
            "example: row, gold, clean_pred, attacked_pred, perturbation_norm, cosine, euclidean) and "
            "OUT/summary.json (the settings used; per epsilon: clean_accuracy, attacked_accuracy = correct after "
            "attack / all, attack_success_rate = flipped / originally correct, mean_cosine and mean_euclidean "
            "between clean and attacked sentence representations)."
        ),
    )
    attack.add_argument(
        "--run", dest="run_dir", metavar="RUN", required=True, type=Path, help="a finished 'carlrar train' run folder"
    )
    attack.add_argument("--data", required=True, type=Path, help="the prepared dataset folder the run was trained on")
    attack.add_argument("--out", required=True, type=Path, help="output folder")
    config_option(attack)
    attack.add_argument(
        "--epsilons",
        type=config_number("analysis.epsilons[]"),
        nargs="+",
        help=setting("epsilons", "l2 radii of the attack, per sentence"),
    )
    common(attack)
    attack.set_defaults(run=_cmd_attack)

    samples = commands.add_parser(
        "samples",
        help="text-form adversarial samples from a RAR run's reconstructor, judged by a base run (Table 6)",
        description=(
            "Attack RUN (a rar or carl_rar run) with k-PGD on DATA's evaluated split, decode its reconstructor's "
            "argmax tokens at the attacked token states, keep the sentences that differ from the original, and "
            "record whether BASE_RUN (the base model of the same seed) classifies the original correctly and the "
            "decoded text wrongly. The settings (samples_epsilon, steps, step size ratio, batch size, seed) are "
            "the analysis section of --config, or the schema's defaults without it; each flag replaces one. "
            "Writes OUT (JSON: the settings used, n_examples, n_changed, n_fool_base and the examples)."
        ),
    )
    samples.add_argument(
        "--run", dest="run_dir", metavar="RUN", required=True, type=Path, help="a finished rar or carl_rar run folder"
    )
    samples.add_argument("--base-run", required=True, type=Path, help="the base run of the same dataset and seed")
    samples.add_argument("--data", required=True, type=Path, help="the prepared dataset folder (e.g. SST-2)")
    samples.add_argument("--out", required=True, type=Path, help="output JSON file")
    config_option(samples)
    samples.add_argument(
        "--epsilon",
        dest="samples_epsilon",
        metavar="EPSILON",
        type=config_number("analysis.samples_epsilon"),
        help=setting("samples_epsilon", "l2 radius of the attack"),
    )
    common(samples)
    samples.set_defaults(run=_cmd_samples)


def _cmd_table7(args: argparse.Namespace) -> None:
    from carlrar.reporting import write_table7

    write_table7(args.metrics, args.out)
    logging.info("Table 7 -> %s.{md,csv}", args.out)


def _cmd_robustness_tables(args: argparse.Namespace) -> None:
    from carlrar.reporting import write_table4, write_table5, write_table6

    write_table4(args.summaries, args.out_dir / "table4_representation")
    write_table5(args.summaries, args.out_dir / "table5_robustness")
    if args.samples:
        write_table6(args.samples, args.out_dir / "table6_samples")
    logging.info("Tables 4, 5%s -> %s", " and 6" if args.samples else "", args.out_dir)


def _cmd_figures(args: argparse.Namespace) -> None:
    from carlrar.figures import write_figures

    for path in write_figures(args.metrics, args.summaries, args.out_dir, paired=args.paired):
        logging.info("wrote %s", path)


def _cmd_paired_table(args: argparse.Namespace) -> None:
    from carlrar.paired import write_table_paired

    frame = write_table_paired(args.metrics, args.summaries, args.out, args.resamples, args.seed)
    significant = int(((frame["ci95_low"] > 0) | (frame["ci95_high"] < 0)).sum()) if len(frame) else 0
    logging.info(
        "paired table: %d comparisons, %d with a 95 %% interval excluding 0 -> %s.{md,csv,tex}",
        len(frame),
        significant,
        args.out,
    )


def _add_paired_parser(commands: argparse._SubParsersAction) -> None:
    """``paired-table``: method differences on the same examples, with paired-bootstrap intervals."""
    paired = commands.add_parser(
        "paired-table",
        help="paired comparison: each method minus FreeLB and minus base, clean and under attack, bootstrap CIs",
        description=(
            "For every dataset, every method against FreeLB and against base (where they ran): the difference in "
            "accuracy (points) on the same examples, clean (each run's eval_predictions.parquet, beside "
            "metrics.json) and under attack at each epsilon (the records_eps*.parquet beside summary.json). "
            "Within each seed both runs are paired by 'row' (gold labels must agree), the per-seed differences "
            "are averaged over the seeds both methods ran, and a paired bootstrap over examples (the same "
            "resampled rows for both methods, numpy default_rng(SEED), RESAMPLES draws) gives the 95 % interval "
            "(2.5th/97.5th percentiles), a two-sided p-value and the minimum detectable effect at 80 % power "
            "((1.96 + 0.84) x bootstrap SE). Runs without per-example files are skipped with a warning. Writes "
            "PREFIX.md, PREFIX.csv and PREFIX.tex."
        ),
    )
    paired.add_argument("--metrics", required=True, nargs="+", type=Path, help="metrics.json files of finished runs")
    paired.add_argument(
        "--summaries", nargs="*", default=[], type=Path, help="summary.json files of 'carlrar attack' (optional)"
    )
    paired.add_argument("--out", required=True, type=Path, help="output prefix, e.g. results/paper/tables/table_paired")
    paired.add_argument(
        "--resamples",
        type=resample_count,
        default=10_000,
        help="bootstrap resamples B, at most 1000000 (default: 10000)",
    )
    paired.add_argument(
        "--seed",
        type=config_number("analysis.seed", int),
        default=2021,
        help="seed of the bootstrap's numpy generator, recorded in the CSV (default: 2021)",
    )
    paired.set_defaults(run=_cmd_paired_table)


def _cmd_hpsearch_select(args: argparse.Namespace) -> None:
    from carlrar.hpsearch import write_selection

    frame = write_selection(args.metrics, args.out_dir)
    for row in frame[frame["rank"] == 1].itertuples():
        logging.info(
            "%s: best of %d trials is %s, dev accuracy %.2f %%",
            row.dataset,
            int((frame["dataset"] == row.dataset).sum()),
            row.trial,
            row.dev_accuracy,
        )
    logging.info("<dataset>/best.yaml, freelb_best.yaml and trials.{md,csv} -> %s", args.out_dir)


def _add_prepare_parser(commands: argparse._SubParsersAction) -> None:
    """``prepare``: the data stage."""
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
    prepare.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.seed=7 (repeatable; values are YAML)",
    )
    prepare.add_argument("--dataset", required=True, choices=DATASET_IDS)
    prepare.add_argument("--raw-dir", type=Path, help="folder of raw datasets (default: the config's raw_dir)")
    prepare.add_argument("--out", required=True, type=Path, help="output folder, e.g. data/processed/sst2")
    prepare.set_defaults(run=_cmd_prepare)


def _add_training_parsers(commands: argparse._SubParsersAction) -> None:
    """``train`` and ``rar-warmup``."""
    train = commands.add_parser(
        "train",
        help="train one (dataset, method, seed) run; restarting the same command resumes it",
        description=(
            "Fine-tune the config's model on DATA (a 'carlrar prepare' folder) with METHOD and write OUT/metrics.json, "
            "OUT/best/ (weights with the best dev accuracy, config and tokenizer) and OUT/checkpoint/ "
            "(resumable state). "
            "On CUDA it leases a GPU slot (lock files in $CARLRAR_GPU_LOCK_DIR; $CARLRAR_GPU_SLOTS runs per GPU). "
            "training.precision auto uses bf16 autocast where the GPU or CPU has native bf16, fp32 elsewhere."
        ),
    )
    train.add_argument("--config", required=True, type=Path, help="YAML config (e.g. config/config.yaml)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set datasets.sst2.freelb.adv_lr=0.05 (repeatable)",
    )
    train.add_argument("--dataset", required=True, choices=DATASET_IDS)
    train.add_argument("--method", required=True, choices=METHOD_IDS)
    train.add_argument(
        "--seed",
        required=True,
        type=config_number("training.seeds[]", int),
        help="training seed (model init, order, dropout, negatives)",
    )
    train.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    train.add_argument("--out", required=True, type=Path, help="run folder")
    train.add_argument("--device", default="auto", help=DEVICE_HELP)
    train.add_argument(
        "--rar-warmup",
        type=Path,
        help="a 'carlrar rar-warmup' folder for this dataset: rar/carl_rar start their reconstructor from it "
        "(when training.rar.warmup_steps > 0; without it such a run makes its own warm-up in OUT/rar_warmup)",
    )
    restart = train.add_mutually_exclusive_group()
    restart.add_argument(
        "--restart",
        dest="restart",
        action="store_const",
        const="always",
        default="never",
        help="discard OUT's checkpoint and results and train from step 0 (without it, a checkpoint of this exact "
        "configuration is resumed and one of another configuration is refused)",
    )
    restart.add_argument(
        "--restart-if-changed",
        dest="restart",
        action="store_const",
        const="if-changed",
        help="discard OUT's checkpoint and results only when another configuration wrote them; resume a checkpoint "
        "of this configuration (what the workflow uses, so an interrupted job resumes and an edited one restarts)",
    )
    train.set_defaults(run=_cmd_train)

    warmup = commands.add_parser(
        "rar-warmup",
        help="fit RAR's reconstructor head on clean inputs (encoder frozen), once per dataset, for every seed",
        description=(
            "For a backbone without a pretrained masked-LM head (e.g. MiniLM): train only the reconstructor head "
            "(the tied word embeddings and the encoder stay frozen) for training.rar.warmup_steps AdamW steps on "
            "DATA's clean training sentences, seeded by training.rar.warmup_seed. Writes "
            "OUT/reconstructor.safetensors and OUT/warmup.json (clean-dev token reconstruction accuracy before and "
            "after); 'carlrar train --rar-warmup OUT' starts rar and carl_rar runs from it."
        ),
    )
    warmup.add_argument("--config", required=True, type=Path, help="YAML config (e.g. config/quick.yaml)")
    warmup.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    warmup.add_argument("--dataset", required=True, choices=DATASET_IDS)
    warmup.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    warmup.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    warmup.add_argument("--device", default="auto", help=DEVICE_HELP)
    warmup.set_defaults(run=_cmd_rar_warmup)


def _add_table_parsers(commands: argparse._SubParsersAction) -> None:
    """``table2``, ``table7``, ``robustness-tables``, ``figures``, ``paired-table``, ``hpsearch-select``."""
    table2 = commands.add_parser(
        "table2",
        help="Table 2: clean accuracy, mean ± std over seeds, difference from FreeLB",
        description="Aggregate metrics.json files into PREFIX.md, PREFIX.csv and PREFIX.tex (each written atomically).",
    )
    table2.add_argument("--metrics", required=True, nargs="+", type=Path, help="metrics.json files of finished runs")
    table2.add_argument(
        "--out", required=True, type=Path, help="output prefix, e.g. results/paper/tables/table2_accuracy"
    )
    table2.set_defaults(run=_cmd_table2)

    table7 = commands.add_parser(
        "table7", help="Table 7: parameter count per method", description="Write PREFIX.md and PREFIX.csv."
    )
    table7.add_argument("--metrics", required=True, nargs="+", type=Path, help="metrics.json files of finished runs")
    table7.add_argument(
        "--out", required=True, type=Path, help="output prefix, e.g. results/paper/tables/table7_params"
    )
    table7.set_defaults(run=_cmd_table7)

    robustness = commands.add_parser(
        "robustness-tables",
        help="Tables 4, 5 and 6 from attack summaries and text-form samples",
        description=(
            "Write OUT_DIR/table4_representation, table5_robustness and (with --samples) table6_samples, each as "
            ".md, .csv and .tex: mean ± standard deviation over seeds per dataset, method and epsilon."
        ),
    )
    robustness.add_argument(
        "--summaries", required=True, nargs="+", type=Path, help="summary.json files of 'carlrar attack'"
    )
    robustness.add_argument("--samples", nargs="*", type=Path, default=[], help="JSON reports of 'carlrar samples'")
    robustness.add_argument("--out-dir", required=True, type=Path, help="tables folder, e.g. results/paper/tables")
    robustness.set_defaults(run=_cmd_robustness_tables)

    figures = commands.add_parser(
        "figures",
        help="figures: accuracy under attack vs epsilon, representation distance, dev learning curves",
        description=(
            "Write PDF and PNG figures (seaborn) to OUT_DIR: robustness_vs_epsilon (accuracy with 95 % t-intervals "
            "over seeds, and the paired difference from FreeLB with its bootstrap interval), "
            "representation_distance (1 - cosine and Euclidean distance, log scale) and learning_curves."
        ),
    )
    figures.add_argument("--metrics", required=True, nargs="+", type=Path, help="metrics.json files of finished runs")
    figures.add_argument(
        "--summaries", required=True, nargs="+", type=Path, help="summary.json files of 'carlrar attack'"
    )
    figures.add_argument("--out-dir", required=True, type=Path, help="figures folder, e.g. results/paper/figures")
    figures.add_argument(
        "--paired",
        type=Path,
        help="table_paired.csv of 'carlrar paired-table' for the differences from FreeLB (default: computed from "
        "the per-example files beside the metrics and summaries)",
    )
    figures.set_defaults(run=_cmd_figures)
    _add_paired_parser(commands)

    hpsearch = commands.add_parser(
        "hpsearch-select",
        help="choose FreeLB's hyperparameters per dataset from grid-search runs (paper A.2, Table 8)",
        description=(
            "Average each trial's dev accuracy over its seeds (the trial's values are read from the config recorded "
            "in metrics.json), rank the trials of each dataset (ties: fewer adv_steps, then smaller init_mag, "
            "adv_lr, adv_max_norm) and write OUT_DIR/<dataset>/best.yaml and OUT_DIR/freelb_best.yaml "
            "('datasets: {<dataset>: {freelb: {...}}}', to merge into a config) and OUT_DIR/trials.{md,csv}."
        ),
    )
    hpsearch.add_argument(
        "--metrics", required=True, nargs="+", type=Path, help="metrics.json files of the trials' 'carlrar train' runs"
    )
    hpsearch.add_argument("--out-dir", required=True, type=Path, help="output folder, e.g. results/paper/hpsearch")
    hpsearch.set_defaults(run=_cmd_hpsearch_select)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="carlrar",
        description="CARL and RAR adversarial training for text classifiers: data, training, attacks, tables.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare_parser(commands)
    _add_training_parsers(commands)
    _add_table_parsers(commands)
    _add_attack_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        keep_host_memory()
        args.run(args)
    except CarlrarError as exc:
        print(f"carlrar {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (disk full, permissions, ...): the user's to fix, not a bug
        print(f"carlrar {args.command}: error: {one_line(str(exc))}; check free space and permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"carlrar {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
