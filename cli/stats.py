"""Per-channel mean/std (in [0, 1]), per-class and per-origin counts, exact duplicates and
image size, in one streaming pass. Each argument is one dataset (a shard, a directory or a
glob); several are shown side by side. Paths piped on stdin form one dataset."""

from __future__ import annotations

import typer

from .common import ALLOW_INCOMPLETE, emit, emit_json, input_paths, progress


def run(
    datasets: list[str] = typer.Argument(
        None,
        help="One dataset per argument: shard, directory or glob (or shard paths on stdin, as one dataset).",
        show_default=False,
    ),
    by: str = typer.Option(None, "--by", help="Split each dataset by 'origin' (real vs fake) side by side."),
    json_output: bool = typer.Option(False, "--json", help="One JSON line per dataset instead of a table."),
    allow_incomplete: bool = ALLOW_INCOMPLETE,
) -> None:
    from tabulate import tabulate

    from fakecifar.errors import UsageError
    from fakecifar.shards import open_shards
    from fakecifar.stats import dataset_stats, stats_table

    args = list(datasets or [])
    groups = [[a] for a in args] if args and args != ["-"] else [input_paths(args)]
    if not groups[0]:
        raise UsageError("no input shards", "give datasets as arguments or pipe shard paths on stdin")
    results = []
    with progress(None, "stats") as bar:
        for group in groups:
            data = open_shards(group, allow_incomplete=allow_incomplete)
            name = group[0] if len(group) == 1 else f"{len(group)} shards"
            results += dataset_stats(data, name, by=by, on_progress=bar.advance)
            data.close()
    if json_output:
        for s in results:
            emit_json(s.to_dict())
        return
    emit(
        tabulate(
            stats_table(results), headers=[""] + [s.name for s in results], tablefmt="simple", disable_numparse=True
        )
    )
