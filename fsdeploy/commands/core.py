"""Core commands: export, info, adapt, predict."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)

PRECISION_HELP = (
    "Engine precision: fp32; int8 on --backend ort or openvino (the graph from `fsdeploy quantize`); bf16 or default "
    "on --backend openvino (CPUs with AVX512-BF16 / AMX); fp16 on --backend trt (engines from `fsdeploy build "
    "--precision fp16`). Default: the bundle's `fsdeploy tune` choice on this CPU, else fp32."
)
BACKEND_HELP = "Engine backend: ort, openvino, torch, trt. Default: the bundle's `fsdeploy tune` choice on this CPU, else ort."
HEAD_HELP = "Per-task head: linear (UpperCaSE zero-init, 500 Adam steps), ncc (prototypes), and the others in `fsdeploy heads`."


def _validation_table(report: dict) -> Table:
    table = Table(title="validation: ONNX Runtime vs PyTorch")
    from fsdeploy.exporters.validate import ValidationReport

    parsed = ValidationReport.from_dict(report)
    for col in ("graph", "inputs", "output", "max |diff|", "max |output|", "cosine", "ok"):
        table.add_column(col)
    for c in parsed.checks:
        table.add_row(
            c.graph, c.inputs, c.name, f"{c.max_abs:.2e}", f"{c.ref_max_abs:.3g}", f"{c.cosine:.6f}",
            "[green]✓[/green]" if parsed.ok(c) else "[red]✗[/red]",
        )
    table.caption = f"tolerance max |diff| ≤ {parsed.atol:g} + {parsed.rtol:g}·max |output|"
    return table


def parse_options(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE strings -> dict, values read as int, float or bool when they look like one."""
    from fsdeploy.errors import InvalidInput

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--head-opt {pair!r} is not KEY=VALUE; e.g. --head-opt optimizer=olor")
        value: object = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        out[key] = value
    return out


def register(app: typer.Typer) -> None:
    """Add export, info, adapt, predict to `app`."""

    @app.command()
    def export(
        model: Annotated[str, typer.Argument(help="timm model name, e.g. efficientnet_b0, resnet18, vit_small_patch16_224.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write (replaced atomically).")],
        adapter: Annotated[str, typer.Option(help="Adaptation module: none, case (UpperCaSE), toast (ViT).")] = "none",
        checkpoint: Annotated[Optional[Path], typer.Option(help="Local weights (.pth or .safetensors).")] = None,
        pretrained: Annotated[bool, typer.Option(help="Download timm's pretrained weights (needs network).")] = False,
        img_size: Annotated[Optional[int], typer.Option(help="Input resolution (default: checkpoint's, then model's).")] = None,
        opset: Annotated[int, typer.Option(help="ONNX opset; >= 17 keeps LayerNorm a single node.")] = 17,
        validate: Annotated[bool, typer.Option(help="Compare ONNX Runtime with PyTorch; refuse a bundle outside tolerance.")] = True,
        calib: Annotated[Optional[Path], typer.Option(help="Folder of your own images to validate on (default: shipped photos).")] = None,
        backbone_checkpoint: Annotated[
            Optional[Path], typer.Option(help="--adapter toast: the frozen backbone weights the TOAST checkpoint was tuned on.")
        ] = None,
    ) -> None:
        """Export a timm backbone (+ adapter) to a validated ONNX bundle.

        Example: fsdeploy export efficientnet_b0 --checkpoint weights.safetensors --adapter case --out bundle/
        """
        from fsdeploy.exporters.export import export_bundle

        with console.status("exporting") as status:
            bundle, report = export_bundle(
                model, out, adapter=adapter, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size,
                opset=opset, validate=validate, calib=calib, progress=lambda m: status.update(m),
                options={"backbone_checkpoint": str(backbone_checkpoint)} if backbone_checkpoint else None,
            )
        if report is not None:
            console.print(_validation_table(report.to_dict()))
        else:
            console.print("[yellow]validation skipped (--no-validate); recorded in the manifest[/yellow]")
        m = bundle.manifest
        console.print(
            f"wrote {out}: {', '.join(g.file for g in m.graphs.values())} | {m.model} adapter={m.adapter} "
            f"input={m.preprocess.input_size} features={m.feature_dim} opset={m.opset} id={m.bundle_id[:12]}"
        )

    @app.command()
    def info(bundle: Annotated[Path, typer.Argument(help="Bundle folder.")]) -> None:
        """Show a bundle's model, graphs with their inputs/outputs, engines and validation."""
        from fsdeploy.exporters.bundle import load_bundle

        b = load_bundle(bundle)
        m = b.manifest
        console.print(f"[bold]{bundle}[/bold]: {m.model} ({m.family}) adapter={m.adapter} id={m.bundle_id[:12]}")
        console.print(f"preprocess: {m.preprocess}")
        table = Table(title="graphs")
        for col in ("graph", "file", "inputs", "outputs"):
            table.add_column(col)
        for name, g in m.graphs.items():
            fmt = lambda specs: ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in specs.items())  # noqa: E731
            table.add_row(name, g.file, fmt(g.inputs), fmt(g.outputs))
        console.print(table)
        if m.validation.get("checks"):
            console.print(_validation_table(m.validation))
        if m.engines:
            console.print_json(json.dumps(m.engines))
        if m.extra.get("tuned"):
            from fsdeploy.commands.tune import print_tuned

            print_tuned(m.extra["tuned"])

    @app.command()
    def adapt(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder from `fsdeploy export`.")],
        support: Annotated[Path, typer.Argument(help="Support images: one sub-folder per class.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Task artefact to write (.npz).")],
        head: Annotated[str, typer.Option(help=HEAD_HELP)] = "linear",
        transform: Annotated[str, typer.Option(help="Feature transform before the head: none, l2, cl2n, ci.")] = "none",
        backend: Annotated[Optional[str], typer.Option(help=BACKEND_HELP)] = None,
        precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP)] = None,
        batch: Annotated[int, typer.Option(help="Images per engine call.")] = 32,
        threads: Annotated[Optional[int], typer.Option(help="CPU threads for the engine.")] = None,
        seed: Annotated[int, typer.Option(help="Seed for the head's random draws.")] = 0,
        adapter: Annotated[
            Optional[str],
            typer.Option(help="Fine-tune per task through the backbone, then fold: tsa (ResNet residual adapters + β) or bn-affine."),
        ] = None,
        steps: Annotated[int, typer.Option(help="Optimiser steps for --adapter tsa / bn-affine (TSA recipe: 40).")] = 40,
        head_opt: Annotated[
            Optional[list[str]],
            typer.Option(help="Head option KEY=VALUE, repeatable, e.g. --head-opt optimizer=olor --head-opt distance=cosine."),
        ] = None,
    ) -> None:
        """Fit a per-task head on the engine features of a support set and write a task artefact.

        Example: fsdeploy adapt bundle/ my_support/ --head linear --out task.npz. With --adapter tsa the
        adapters are fitted in PyTorch, folded into the conv weights, and the re-exported graph is stored in the task.
        """
        from fsdeploy.exporters.bundle import load_bundle
        from fsdeploy.task import adapt_task
        from fsdeploy.tune import resolve_choice

        b = load_bundle(bundle)
        with console.status("adapting"):
            if adapter:
                from fsdeploy.errors import InvalidInput
                from fsdeploy.finetune_task import adapt_finetuned

                if precision not in (None, "fp32"):
                    raise InvalidInput(f"--adapter {adapter} runs its own folded fp32 graph; drop --precision {precision}")
                task, t = adapt_finetuned(b, support, out, method=adapter, steps=steps)
                console.print(
                    f"{adapter}: adaptation MACs {task.info['adapt_macs']:.3e} ({task.info['steps']} steps x forward+backward), "
                    f"folded graph max |diff| {task.info['fold_max_abs']:.1e}"
                )
            else:
                choice = resolve_choice(b, backend, precision, threads=threads)
                if choice.note:
                    err.print(choice.note)
                task, t = adapt_task(
                    b, support, out, head=head, transform=transform, backend=choice.backend, head_opts=parse_options(head_opt or []),
                    options=choice.options, batch=batch, seed=seed,
                )
        console.print(
            f"wrote {out}: {len(task.classes)} classes, {task.info['support']} support images, head={task.info['head']} | "
            f"load {t.load_ms:.0f} ms, features {t.features_ms:.0f} ms, fit {t.fit_ms:.0f} ms, write {t.write_ms:.0f} ms"
        )

    @app.command()
    def predict(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
        task: Annotated[Path, typer.Argument(help="Task artefact from `fsdeploy adapt`.")],
        images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
        topk: Annotated[int, typer.Option(help="How many labels per image.")] = 1,
        backend: Annotated[Optional[str], typer.Option(help=BACKEND_HELP)] = None,
        precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP)] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines for machines.")] = False,
    ) -> None:
        """Classify images with a stored task: top-k labels with probabilities."""
        from fsdeploy.exporters.bundle import load_bundle
        from fsdeploy.task import TaskArtefact, predict_images
        from fsdeploy.tune import resolve_choice

        b = load_bundle(bundle)
        t = TaskArtefact.load(task)
        t.check_bundle(b, task)
        # a task with its own folded graph runs that graph (ort fp32): a tuned choice does not apply to it
        choice = resolve_choice(b, backend, precision) if "graph" not in t.task_state else resolve_choice(b, backend or "ort", precision)
        if choice.note:
            err.print(choice.note)
        preds = predict_images(b, t, images, topk=topk, backend=choice.backend, options=choice.options)
        if as_json:
            for p in preds:
                typer.echo(json.dumps({"image": p.image, "labels": list(p.labels), "probs": list(p.probs)}))
            return
        table = Table(title=f"predictions ({task.name})")
        table.add_column("image")
        table.add_column("top labels (probability)")
        for p in preds:
            table.add_row(p.image, ", ".join(f"{lab} ({pr:.3f})" for lab, pr in zip(p.labels, p.probs)))
        console.print(table)
