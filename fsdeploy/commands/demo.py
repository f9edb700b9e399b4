"""`fsdeploy demo`: the whole path on shipped data, on the embedded default (ONNX Runtime, CPU)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from fsdeploy.commands.output import err_console, out_console

console = out_console()
err = err_console()


def register(app: typer.Typer) -> None:
    """Add `demo` to `app`."""

    @app.command()
    def demo(
        workdir: Annotated[Path, typer.Option(help="Where the corpus and bundles go (reused between runs).")] = Path(
            "fsdeploy-demo"
        ),
        episodes: Annotated[int, typer.Option(min=1, help="Episodes per setting (600 for paper-style CIs).")] = 100,
        ways: Annotated[int, typer.Option(min=1, help="Classes per episode.")] = 5,
        shots: Annotated[str, typer.Option(help="Comma-separated support images per class.")] = "1,5",
        threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads for ONNX Runtime.")] = None,
    ) -> None:
        """Export the shipped backbone, adapt to novel glyph classes with every head, print accuracy and times.

        Data: characters rendered from Debian font packages (classes = characters, instances = typefaces);
        the backbone (efficientnet_b0, fsdeploy/weights) was pretrained on the base classes only.
        """
        from fsdeploy.demo import run_demo

        from fsdeploy.commands.bench import _ints

        k = _ints(shots, "--shots")
        from fsdeploy.commands.progress import counting

        with counting(console, "demo") as bar:
            task = bar.add_task("episodes", total=episodes * len(k) * 2)
            result = run_demo(
                workdir, episodes=episodes, ways=ways, shots=k, threads=threads,
                say=lambda m: err.print(f"[dim]{m}[/dim]"), tick=lambda n: bar.advance(task, n),
            )
        table = Table(title=f"{ways}-way novel-class accuracy (% ± 95% CI over {episodes} episodes), ONNX Runtime CPU")
        table.add_column("bundle")
        table.add_column("method")
        for s in k:
            table.add_column(f"{s}-shot")
        table.add_column(f"adapt ms, {k[-1]}-shot (features+fit)", justify="right")
        table.add_column("query ms/img", justify="right")
        methods = list(dict.fromkeys((r.bundle, r.method) for r in result.rows))
        for b, m in methods:
            mine = {r.shots: r for r in result.rows if (r.bundle, r.method) == (b, m)}
            last = mine[k[-1]]
            table.add_row(
                b, m, *[f"{mine[s].accuracy:.1f} ± {mine[s].ci95:.1f}" for s in k],
                f"{last.features_ms:.1f} + {last.fit_ms:.1f}", f"{last.query_ms_per_image:.2f}",
            )
        console.print(table)
        console.print(
            f"backbone: {'pretrained on glyph base classes' if result.pretrained else 'RANDOM INIT (no shipped weights)'}; "
            f"CaSE: {result.case_source}; {result.novel_classes} novel classes from {result.corpus}"
        )
