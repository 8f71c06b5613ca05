"""``fusion manifest``: turn poster datasets into manifests, then split and describe them.

Only the standard library, typer and rich are imported at start-up; pandas and friends load
inside the commands, so ``fusion --help`` stays fast.
"""

import csv
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from posterfusion.errors import PosterFusionError, user_errors
from posterfusion.importers import IMPORTERS, ImportResult, RowProblem

manifest_app = typer.Typer(
    help="Make poster manifests (CSV: poster, genres) from public datasets, split and "
    "describe them.",
    no_args_is_help=True,
)

#: The formats ``import`` accepts, taken from the registry so help and code cannot disagree.
Format = Enum("Format", {name: name for name in IMPORTERS}, type=str)  # type: ignore[misc]

#: Problems listed on screen; ``--report`` has them all.
SHOWN_PROBLEMS = 20

console = Console(soft_wrap=True, highlight=False)

def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


@manifest_app.command("import")
@user_errors
def import_(
    format: Annotated[Format, typer.Argument(help="How SOURCE is laid out.", case_sensitive=False)],
    source: Annotated[Path, typer.Argument(
        help="The dataset's table (movies_metadata.csv, MovieGenre.csv, title.basics.tsv[.gz], "
        "a one-hot CSV) or folder (folders: one sub-folder per genre; mmimdb: the folder "
        "with dataset/; movielens: the folder with movies.csv and links.csv).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write.")],
    images: Annotated[Optional[list[Path]], typer.Option(
        help="Folder holding the posters; repeat it for posters spread over several folders (the "
        "first that has a poster wins). Default: SOURCE's folder and its posters/, images/ or "
        "dataset/ sub-folder.")] = None,
    min_year: Annotated[Optional[int], typer.Option(help="Keep titles from this year on.")] = None,
    max_year: Annotated[Optional[int], typer.Option(help="Keep titles up to this year.")] = None,
    title_types: Annotated[Optional[str], typer.Option(
        help="Keep only these title types, comma-separated (IMDb titleType, MM-IMDb kind), "
        "e.g. movie,tvMovie.")] = None,
    merge: Annotated[Optional[list[str]], typer.Option(
        metavar="OLD,OTHER=NEW",
        help='Merge genres: "Music,Musical=Music". Repeatable; "Short,News=" drops them.')] = None,
    drop_below: Annotated[int, typer.Option(
        help="Drop genres with fewer than this many posters.")] = 0,
    other_below: Annotated[int, typer.Option(
        help="Merge genres with fewer than this many posters into 'Other'.")] = 0,
    encoding: Annotated[Optional[str], typer.Option(
        help="Text encoding of SOURCE (e.g. cp1252). Default: UTF-8, UTF-16 by its BOM, "
        "Latin-1 for moviegenre.")] = None,
    report: Annotated[Optional[Path], typer.Option(
        help="Write every skipped row to this CSV (file, line, kind, reason).")] = None,
) -> None:
    """Import a poster dataset as a manifest, leaving out and reporting rows that cannot be used."""
    from posterfusion.importers import (
        CleanupOptions, import_manifest, parse_merge, parse_title_types,
    )
    from posterfusion.files import check_writable
    from posterfusion.manifest_tools import write_manifest

    check_writable(out, "--out")
    check_writable(report, "--report")
    options = CleanupOptions(
        min_year=min_year, max_year=max_year, title_types=parse_title_types(title_types),
        merge=parse_merge(merge or []), drop_below=drop_below, other_below=other_below,
    )
    result = import_manifest(
        format.value, source, out, images=images, options=options, encoding=encoding
    )
    _show_problems(result.problems, report)
    if result.manifest.empty:
        why = (f"{result.filtered:,} filtered out by --min-year/--max-year/--title-types, "
               if result.filtered else "")
        raise PosterFusionError(
            f"no posters left to import from {source} ({why}{len(result.problems):,} skipped); "
            f"{out} not written"
        )
    write_manifest(result.manifest, out)
    _show_summary(result, out, drop_below or other_below)


def _show_problems(problems: list[RowProblem], report: Optional[Path]) -> None:
    for problem in problems[:SHOWN_PROBLEMS]:
        console.print(str(problem), markup=False)
    if len(problems) > SHOWN_PROBLEMS:
        hint = "" if report else " (list them all with --report problems.csv)"
        console.print(f"... and {len(problems) - SHOWN_PROBLEMS:,} more{hint}", markup=False)
    if report is not None:
        try:
            report.parent.mkdir(parents=True, exist_ok=True)
            with report.open("w", encoding="utf-8", newline="") as stream:
                writer = csv.writer(stream)
                writer.writerow(["file", "line", "kind", "reason"])
                writer.writerows([p.file, "" if p.line is None else p.line, p.kind, p.reason]
                                 for p in problems)
        except OSError as error:
            raise PosterFusionError(f"cannot write --report {report}: {error.strerror}") from None


def _show_summary(result: ImportResult, out: Path, threshold: int) -> None:
    genres = {g for cell in result.manifest["genres"] for g in cell.split("|") if g}
    console.print(
        f"[bold green]Imported {_plural(len(result.manifest), 'poster')}[/] with "
        f"{_plural(len(genres), 'genre')} into {escape(str(out))}; skipped "
        f"{_plural(result.count('malformed'), 'malformed row')}, "
        f"{_plural(result.count('missing'), 'missing image')}, "
        f"{_plural(result.count('duplicate'), 'duplicate')}"
        + (f"; {result.filtered:,} filtered out by year or title type" if result.filtered else "")
    )
    if result.rare_genres:
        action = f"merged into {result.rare_into}" if result.rare_into else "dropped"
        listed = ", ".join(f"{name} ({n})" for name, n in result.rare_genres.items())
        console.print(
            f"Genres with fewer than {threshold} posters {action}: {listed}", markup=False
        )
    if result.unlabeled:
        console.print(f"{_plural(result.unlabeled, 'poster')} with no genre (kept as negatives)")


@manifest_app.command()
@user_errors
def split(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV to split.", show_default=False)],
    val: Annotated[float, typer.Option(help="Share of posters for validation.")] = 0.15,
    test: Annotated[float, typer.Option(help="Share of posters for testing.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same split.")] = 0,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write here instead of updating MANIFEST.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing split column.")] = False,
) -> None:
    """Add a split column (train/val/test) that keeps each genre's share in every split."""
    from posterfusion.files import check_writable
    from posterfusion.manifest_tools import (
        manifest_stats, read_manifest, rebase_posters, split_manifest, write_manifest,
    )

    check_writable(out or manifest, "--out" if out else "manifest")
    frame = split_manifest(read_manifest(manifest), val, test, seed, force=force)
    target = out or manifest
    if out is not None:
        frame = rebase_posters(frame, manifest.parent, out.parent)
    write_manifest(frame, target)
    sizes = frame["split"].value_counts()
    console.print(
        f"[bold green]Split {_plural(len(frame), 'poster')}[/] into "
        + ", ".join(f"{name} {sizes.get(name, 0):,}" for name in ("train", "val", "test"))
        + f" (seed {seed}) in {escape(str(target))}"
    )
    stats = manifest_stats(frame)
    for name in ("val", "test"):
        absent = [g for g in stats.counts if name in sizes and g not in stats.splits.get(name, {})]
        if absent:
            console.print(f"No {name} posters for: {', '.join(absent)} (too few posters)",
                          markup=False)


@manifest_app.command()
@user_errors
def combine(
    manifests: Annotated[list[Path], typer.Argument(help="Labelled manifest CSVs, e.g. each already split.",
                                                    show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write.")],
) -> None:
    """Join labelled manifests into one, naming each row's manifest in a 'source' column."""
    from posterfusion.files import check_writable
    from posterfusion.manifest_tools import combine_manifests, write_manifest

    check_writable(out, "--out")
    frame, repeated = combine_manifests(manifests, out.parent)
    write_manifest(frame, out)
    sizes = frame["source"].value_counts(sort=False)
    console.print(
        f"[bold green]Combined {_plural(len(frame), 'poster')}[/] in {escape(str(out))}: "
        + ", ".join(f"{escape(name)} {count:,}" for name, count in sizes.items())
        + (f"; {_plural(repeated, 'poster')} listed again (same file or IMDb id) left out" if repeated else "")
    )


@manifest_app.command()
@user_errors
def stats(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV to describe.", show_default=False)],
    plot: Annotated[Optional[Path], typer.Option(
        help="Also write a bar chart of genre counts to this PNG.")] = None,
    pairs: Annotated[int, typer.Option(help="How many co-occurring genre pairs to list.")] = 10,
) -> None:
    """Print genre counts, genres per poster and the genres that most often go together."""
    from posterfusion.files import check_writable
    from posterfusion.manifest_tools import manifest_stats, plot_genre_counts, read_manifest

    check_writable(plot, "--plot")
    result = manifest_stats(read_manifest(manifest))
    console.print(
        f"[bold]{_plural(result.posters, 'poster')}[/], {_plural(len(result.counts), 'genre')}; "
        f"label cardinality {result.cardinality:.2f} genres per poster, "
        f"density {result.density:.3f}"
    )
    table = Table("genre", "posters", "share", title="Genres")
    for split in result.splits:
        table.add_column(split, justify="right")
    for name, count in result.counts.items():
        share = f"{count / result.posters:.1%}"
        table.add_row(escape(name), f"{count:,}", share,
                      *(f"{result.splits[s].get(name, 0):,}" for s in result.splits))
    console.print(table)
    per_poster = Table("genres per poster", "posters", title="Label cardinality")
    for k, n in result.per_poster.items():
        per_poster.add_row(str(k), f"{n:,}")
    console.print(per_poster)
    if result.pairs and pairs > 0:
        together = Table("genre", "with", "posters", "share of the first", title="Co-occurrence")
        for a, b, n in result.pairs[:pairs]:
            together.add_row(escape(a), escape(b), f"{n:,}", f"{n / result.counts[a]:.0%}")
        console.print(together)
    if plot is not None:
        plot_genre_counts(result, plot)
        console.print(f"Chart written to {plot}", markup=False)
