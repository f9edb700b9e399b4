"""`fsdeploy data ...`: make few-shot corpora on this machine (thin CLI over fsdeploy.data)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fsdeploy.commands.output import out_console
from fsdeploy.commands.aliases import renamed

console = out_console()

data_app = typer.Typer(
    help=(
        "Make few-shot image corpora without downloads.\n\n"
        "`fsdeploy data glyphs --out data/glyphs` renders characters from the installed fonts: an Omniglot-like "
        "corpus with base / val / novel class splits, used by `fsdeploy pretrain` and the benchmarks."
    ),
    no_args_is_help=True,
)


@data_app.command("glyphs", cls=renamed({"--size": "--img-size"}))
def glyphs(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write: <out>/<U+XXXX_script>/<typeface>.png and <out>/splits.json.")],
    size: Annotated[int, typer.Option("--img-size", min=1, help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the affine and stroke jitter; same seed + same fonts = identical files.")] = 0,
    min_instances: Annotated[int, typer.Option(help="Keep characters drawn by at least this many distinct typefaces.")] = 10,
    max_instances: Annotated[Optional[int], typer.Option(help="Keep at most this many typefaces per character.")] = None,
    classes: Annotated[Optional[int], typer.Option(help="Keep only N classes, shared across the splits (a quick slice for tests).")] = None,
    styles_per_family: Annotated[int, typer.Option(help="1: one regular font per family; 2: regular and bold.")] = 2,
    font_dir: Annotated[Optional[list[Path]], typer.Option("--font-dir", help="Where to look for .ttf/.otf files (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", "--force", help="Replace an existing glyph corpus at --out (--force: same, the spelling export uses).")] = False,
) -> None:
    """Render a few-shot corpus of characters from the installed typefaces.

    Classes are Unicode letters and digits (Latin, Greek, Cyrillic, Armenian, Georgian, Hebrew, Arabic, Lao, ... as the fonts allow); instances are typefaces (a family's regular and bold), each with mild seeded rotation, scaling, shift and stroke-width jitter. Whole scripts are held out: novel classes come from alphabets that base never shows, so a backbone pretrained on base is tested on truly new characters.

    Needs the Debian font packages: apt-get install fonts-noto-core fonts-dejavu-core fonts-freefont-ttf

    Examples:

      fsdeploy data glyphs --out data/glyphs

      fsdeploy data glyphs --out /tmp/tiny --classes 24 --max-instances 10 --img-size 32
    """
    from fsdeploy.data.glyphs import SPLITS, generate_glyphs
    from fsdeploy.data.typefaces import DEFAULT_FONT_DIRS

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                label = {"analyse": "finding distinct drawings", "render": "rendering images"}.get(stage, stage)
                tasks[stage] = bar.add_task(label, total=total)
            bar.update(tasks[stage], completed=done)

        corpus = generate_glyphs(
            out, size=size, seed=seed, min_instances=min_instances, max_instances=max_instances, classes=classes,
            styles_per_family=styles_per_family, font_dirs=tuple(font_dir or DEFAULT_FONT_DIRS), overwrite=overwrite,
            progress=progress,
        )
    table = Table(title=f"glyph corpus at {corpus.root}")
    table.add_column("split")
    table.add_column("classes", justify="right")
    for split in SPLITS:
        table.add_row(split, str(corpus.classes_per_split[split]))
    table.add_row("total", str(sum(corpus.classes_per_split.values())))
    console.print(table)
    scripts = ", ".join(f"{k} {v}" for k, v in sorted(corpus.classes_per_script.items(), key=lambda kv: -kv[1]))
    console.print(f"scripts: {scripts}")
    console.print(
        f"{corpus.images} images of {size}px from {corpus.typefaces} typefaces; {corpus.instances_min}-{corpus.instances_max} "
        f"per class (at least {corpus.families_min} font families); images sha256 {corpus.images_sha256[:16]}; "
        f"{corpus.seconds:.0f} s"
    )


def register(app: typer.Typer) -> None:
    """Add the `data` command group to `app`."""
    app.add_typer(data_app, name="data")
