"""Small raw files the tests write for themselves, in the datasets' official formats."""

from __future__ import annotations


def sst2_rows(n: int) -> str:
    """A GLUE SST-2 TSV of ``n`` invented sentences, labels alternating 0, 1."""
    nouns = ["film", "plot", "cast", "story", "score", "script", "ending", "pace"]
    lines = [f"a {nouns[i % 8]} so {'good' if i % 2 else 'bad'} {nouns[(i * 3) % 8]} \t{i % 2}" for i in range(n)]
    return "sentence\tlabel\n" + "\n".join(lines) + "\n"
