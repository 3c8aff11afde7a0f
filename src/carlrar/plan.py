"""The jobs of one workflow run and the params that decide when each reruns, for Snakemake and DVC alike.

The Snakemake rules (workflow/rules/common.smk) take each job's ``settings`` and ``code`` params from
:func:`job_params`; ``dvc_stage.py fingerprints`` writes :func:`all_params` to the file the DVC stages declare
as params. One source, so both tools rerun the same work for the same change. Light (standard library and the
config's schema check only): the workflow calls it while parsing.
"""

from __future__ import annotations

from typing import Any

from carlrar import fingerprints
from carlrar.fingerprints import code_fingerprint, digest
from carlrar.registry import METHODS

TRAINING_ENTRY, WARMUP_ENTRY, ATTACK_ENTRY, DATA_ENTRY = "training.py", "rar_warmup.py", "attacks.py", "data.py"
# The analysis keys each command reads (analysis.datasets and samples_dataset only shape the grid).
ATTACK_SETTINGS = ("epsilons", "steps", "step_size_ratio", "batch_size", "seed")
SAMPLES_SETTINGS = ("samples_epsilon", "steps", "step_size_ratio", "batch_size", "seed")
# The jobs that gather every run, and the module each one runs.
GATHERING_ENTRIES = {
    "table2": "reporting.py",
    "table7": "reporting.py",
    "robustness_tables": "reporting.py",
    "paired_table": "paired.py",
    "figures": "figures.py",
}


def reconstruction_methods(config: dict[str, Any]) -> list[str]:
    return [m for m in config["training"]["methods"] if METHODS[m].reconstruction]


def warmup_datasets(config: dict[str, Any]) -> list[str]:
    """The datasets whose rar / carl_rar runs start from a shared reconstructor warm-up."""
    wanted = reconstruction_methods(config) and config["training"]["rar"]["warmup_steps"]
    return list(config["datasets"]) if wanted else []


def attacked_datasets(config: dict[str, Any]) -> list[str]:
    chosen = config["analysis"]["datasets"]
    return [d for d in config["datasets"] if chosen is None or d in chosen]


def sampled_runs(config: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Table 6's (dataset, method, seed): the rar / carl_rar runs of analysis.samples_dataset, judged by base."""
    dataset = config["analysis"]["samples_dataset"]
    if dataset not in config["datasets"] or "base" not in config["training"]["methods"]:
        return []
    return [(dataset, m, int(s)) for m in reconstruction_methods(config) for s in config["training"]["seeds"]]


def runs(config: dict[str, Any], datasets: list[str] | None = None) -> list[tuple[str, str, int]]:
    """Every (dataset, method, seed) of the grid, or of the given datasets."""
    names = list(config["datasets"]) if datasets is None else datasets
    return [(d, m, int(s)) for d in names for m in config["training"]["methods"] for s in config["training"]["seeds"]]


def job_params(config: dict[str, Any], rule: str, dataset: str = "", method: str = "") -> dict[str, str]:
    """The ``settings`` and ``code`` digests of one job (the seed is in its path, never in its params)."""
    if rule == "prepare":
        return {
            "settings": digest(fingerprints.prepare_settings(config, dataset)),
            "code": code_fingerprint(DATA_ENTRY),
        }
    if rule == "rar_warmup":
        return {"settings": digest(fingerprints.warmup_settings(config)), "code": code_fingerprint(WARMUP_ENTRY, "rar")}
    if rule == "train":
        settings = fingerprints.method_settings(config, dataset, method)
        return {"settings": digest(settings), "code": code_fingerprint(TRAINING_ENTRY, method)}
    if rule in ("attack", "samples"):
        keys = ATTACK_SETTINGS if rule == "attack" else SAMPLES_SETTINGS
        settings = {key: config["analysis"][key] for key in keys}
        return {"settings": digest(settings), "code": code_fingerprint(ATTACK_ENTRY, method)}
    if rule in GATHERING_ENTRIES:
        return {"code": code_fingerprint(GATHERING_ENTRIES[rule])}
    raise ValueError(f"no params are defined for rule {rule!r}")


def all_params(config: dict[str, Any]) -> dict[str, Any]:
    """Every job's params, keyed rule -> dataset -> method -> seed (what the DVC stages declare)."""

    def per_run(rule: str, grid: list[tuple[str, str, int]]) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        for dataset, method, seed in grid:
            tree.setdefault(dataset, {}).setdefault(method, {})[f"seed{seed}"] = job_params(
                config, rule, dataset, method
            )
        return tree

    return {
        "prepare": {d: job_params(config, "prepare", d) for d in config["datasets"]},
        "rar_warmup": {d: job_params(config, "rar_warmup", d) for d in warmup_datasets(config)},
        "train": per_run("train", runs(config)),
        "attack": per_run("attack", runs(config, attacked_datasets(config))),
        "samples": per_run("samples", sampled_runs(config)),
        "tables": {rule: job_params(config, rule) for rule in GATHERING_ENTRIES},
    }
