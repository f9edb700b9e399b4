"""Core commands: export, info, adapt, predict."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from fsdeploy.commands.output import err_console, out_console
from fsdeploy.commands.progress import progress, progress_steps

console = out_console()
err = err_console()
OPSET_MIN, OPSET_MAX = 9, 20  # 9: lowest that exports these backbones (checked); 20: torch.onnx TorchScript exporter max

PRECISION_HELP = (
    "Engine precision: fp32; int8 on --backend ort or openvino (the graph from `fsdeploy quantize`); bf16, bf16-mixed "
    "(high-resolution layers kept f32) or default on --backend openvino (CPUs with AVX512-BF16 / AMX); fp16 on --backend trt (engines from `fsdeploy build "
    "--precision fp16`). Default: the bundle's `fsdeploy tune` choice on this CPU, else fp32."
)


def _device_help() -> str:
    from fsdeploy.engines.devices import HELP

    return HELP


def _adapter_help(exported: bool) -> str:
    """The adapter kinds of the registry, each with its one-line summary (for --help)."""
    from fsdeploy.adapters import ADAPTERS

    return "; ".join(f"{k.name}: {k.summary}" for k in ADAPTERS.values() if k.exported == exported)


def _steps_help() -> str:
    from fsdeploy.adapters import steps_help

    return steps_help()


def _head_help() -> str:
    from fsdeploy.commands.head_options import METHOD_ALIASES
    from fsdeploy.heads import HEADS

    return (f"Per-task head: {', '.join([*HEADS.names(), *METHOD_ALIASES])} (see `fsdeploy heads`). Default linear: "
            "UpperCaSE's zero-init head, 500 Adam steps. Per-task fine-tuners (--adapter) store their own head.")


def _adapt_doc() -> str:
    from fsdeploy.commands.head_options import options_help

    return (
        "Adapt to one task from a support set and write a task artefact.\n\n"
        "Example: fsdeploy adapt bundle/ my_support/ --head linear --out task.npz. With --adapter tsa the "
        "adapters are fitted in PyTorch, folded into the conv weights, and the re-exported graph and the weights it "
        "was folded from are stored in the task. TSA on images like the backbone's training data: --adapter tsa "
        "--domain seen. OLOR fine-tuning of the BatchNorm affine weights: --adapter bn-affine --optimizer olor.\n\n"
        f"--head-opt keys per head (defaults): {options_help()}."
    )


ADAPT_DOC = _adapt_doc()
DeviceOpt = Annotated[Optional[str], typer.Option(help=_device_help())]


def with_device(choice, device: Optional[str]):
    """The engine choice with `--device` applied (checked against its backend first)."""
    import dataclasses

    from fsdeploy.engines.devices import check_device

    if device is None:
        return choice
    check_device(choice.backend, device)
    return dataclasses.replace(choice, options=dataclasses.replace(choice.options, device=device))


BACKEND_HELP = "Engine backend: ort, openvino, torch, trt. Default: the bundle's `fsdeploy tune` choice on this CPU, else ort."


def _validation_table(report: dict) -> Table:
    from fsdeploy.commands.tables import compare_table
    from fsdeploy.compare import CompareReport

    return compare_table(CompareReport.from_dict(report), title="validation: ONNX Runtime vs PyTorch", ref="max |output|")


def _duration(ms: float) -> str:
    """Milliseconds as people read them: '412 ms', '5.3 s', '5 min 34 s'."""
    if ms < 1_000:
        return f"{ms:.0f} ms"
    if ms < 59_950:
        return f"{ms / 1e3:.1f} s"
    seconds = round(ms / 1e3)
    return f"{seconds // 60} min {seconds % 60} s"


def parse_options(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE strings -> dict, values read as int, float or bool when they look like one."""
    from fsdeploy.errors import InvalidInput

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--head-opt {pair!r} is not KEY=VALUE; e.g. --head-opt optimizer=rollback")
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
        out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write: a new name, or an existing bundle with --force (replaced atomically).")],
        adapter: Annotated[str, typer.Option(help="Adaptation module exported into the bundle. " + _adapter_help(True))] = "none",
        checkpoint: Annotated[Optional[Path], typer.Option(help="Local weights (.pth or .safetensors). Without it (and --pretrained) the weights are random: warned and recorded.")] = None,
        pretrained: Annotated[bool, typer.Option(help="Download timm's pretrained weights (needs network).")] = False,
        img_size: Annotated[Optional[int], typer.Option(min=1, help="Input resolution in pixels (default: checkpoint's, then model's).")] = None,
        opset: Annotated[int, typer.Option(min=OPSET_MIN, max=OPSET_MAX, help=f"ONNX opset {OPSET_MIN}-{OPSET_MAX}; >= 17 keeps LayerNorm a single node.")] = 17,
        validate: Annotated[bool, typer.Option(help="Compare ONNX Runtime with PyTorch; refuse a bundle outside tolerance.")] = True,
        calib: Annotated[Optional[Path], typer.Option(help="Folder of your own images to validate on (default: shipped photos).")] = None,
        backbone_checkpoint: Annotated[
            Optional[Path], typer.Option(help="--adapter toast: the frozen backbone weights the TOAST checkpoint was tuned on.")
        ] = None,
        base_data: Annotated[
            Optional[Path],
            typer.Option(help="Images of the classes the backbone was trained on (one sub-folder per class): their mean "
                              "feature is stored for SimpleShot (--transform cl2n). Not for --adapter case."),
        ] = None,
        base_split: Annotated[str, typer.Option(help="With BASE_DATA/splits.json (a glyph corpus): the split to average (all: every class).")] = "base",
        force: Annotated[bool, typer.Option("--force", "--overwrite", help="Replace an existing bundle at --out (its engines, int8 graph and task compatibility are lost). Other files are never replaced.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (files, id, validation) instead of tables.")] = False,
    ) -> None:
        """Export a timm backbone (+ adapter) to a validated ONNX bundle.

        Example: fsdeploy export efficientnet_b0 --checkpoint weights.safetensors --adapter case --out bundle/

        For SimpleShot, add the base-class mean: fsdeploy export efficientnet_b0 --checkpoint fsdeploy/weights/efficientnet_b0_glyphs.safetensors --base-data data/glyphs --out bundle/
        (the glyph corpus's base split is what the shipped checkpoint was trained on; the bundle id does not change).
        """
        from fsdeploy.outputs import check_bundle_out
        from fsdeploy.pipeline.export import export_bundle

        losses = check_bundle_out(out, overwrite=force)  # refuse before minutes of work
        if base_data is not None:  # check the folder (and the adapter) before the export, not after it
            from fsdeploy.data.folders import scan_image_folder
            from fsdeploy.errors import InvalidInput
            from fsdeploy.pipeline.base_mean import STATIC_ADAPTERS, split_classes

            if adapter not in STATIC_ADAPTERS:
                raise InvalidInput(f"--base-data is for bundles whose features do not depend on the support set ({', '.join(STATIC_ADAPTERS)}); drop it for --adapter {adapter}")
            scan_image_folder(base_data, classes=split_classes(base_data, base_split))
        with progress(err if as_json else console, "exporting") as status:
            bundle, report = export_bundle(
                model, out, adapter=adapter, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size,
                opset=opset, validate=validate, calib=calib, progress=lambda m: status.update(m),
                options={"backbone_checkpoint": str(backbone_checkpoint)} if backbone_checkpoint else None, overwrite=force,
            )
        if base_data is not None:
            from fsdeploy.pipeline.base_mean import add_base_mean, split_classes

            with progress(err if as_json else console, "computing the base-class mean feature") as status:
                bundle = add_base_mean(bundle, base_data, classes=split_classes(base_data, base_split),
                                       progress=lambda i, n: status.update(f"base-class mean: {i}/{n} images", often=i < n))
            rec = bundle.manifest.extra["base_mean"]
            if not as_json:
                console.print(f"base-class mean of {rec['images']} images in {rec['classes']} classes -> {rec['file']}")
        m = bundle.manifest
        if as_json:
            typer.echo(json.dumps({
                "out": str(out), "model": m.model, "adapter": m.adapter, "bundle_id": m.bundle_id,
                "files": sorted(m.files), "input_size": list(m.preprocess.input_size), "feature_dim": m.feature_dim,
                "opset": m.opset, "validated": report is not None, "passed": bool(report.passed) if report else None,
                "random_init": bool(m.source.get("random_init")), "replaced": losses,
            }))
            return
        if losses:
            console.print(f"[yellow]replaced the bundle at {out}: lost {losses}[/yellow]")
        if report is not None:
            console.print(_validation_table(report.to_dict()))
        else:
            console.print("[yellow]validation skipped (--no-validate); recorded in the manifest[/yellow]")
        console.print(
            f"wrote {out}: {', '.join(g.file for g in m.graphs.values())} | {m.model} adapter={m.adapter} "
            f"input={m.preprocess.input_size} features={m.feature_dim} opset={m.opset} id={m.bundle_id[:12]}"
        )

    @app.command()
    def info(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON (for scripts).")] = False,
    ) -> None:
        """Show a bundle's model, graphs with their inputs/outputs, engines and validation."""
        from fsdeploy.bundle import load_bundle

        b = load_bundle(bundle)
        m = b.manifest
        if as_json:
            typer.echo(json.dumps({"path": str(bundle), "bundle_id": m.bundle_id, **json.loads(m.to_json())}, sort_keys=True))
            return
        console.print(f"[bold]{bundle}[/bold]: {m.model} ({m.family}) adapter={m.adapter} id={m.bundle_id[:12]}")
        if m.source.get("random_init"):
            console.print("[yellow]weights: RANDOM INIT (exported without --checkpoint or --pretrained); features are not meaningful[/yellow]")
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
        if m.variants:
            vt = Table(title="variants (INT8/FP16 graphs, TensorRT engines)")
            for col in ("file", "graph", "kind", "precision", "sha256"):
                vt.add_column(col)
            for v in m.variants.values():
                vt.add_row(v.file, v.graph, v.kind, v.precision, v.sha256[:12])
            console.print(vt)
        if m.extra.get("tuned"):
            from fsdeploy.commands.tune import print_tuned

            print_tuned(m.extra["tuned"])

    @app.command(help=ADAPT_DOC)
    def adapt(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder from `fsdeploy export`.")],
        support: Annotated[Path, typer.Argument(help="Support images: one sub-folder per class (nested sub-folders count for their class).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Task artefact to write (.npz); an existing task artefact is replaced, any other file refused.")],
        head: Annotated[str, typer.Option(help=_head_help())] = "linear",
        transform: Annotated[str, typer.Option(help="Feature transform before the head: none, l2, cl2n (SimpleShot: the bundle's base-class mean, see export --base-data), cl2n-support, ci (pair with --head-opt distance=cosine).")] = "none",
        backend: Annotated[Optional[str], typer.Option(help=BACKEND_HELP)] = None,
        precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP)] = None,
        batch: Annotated[int, typer.Option(min=1, help="Images per engine call.")] = 32,
        threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads for the engine.")] = None,
        device: DeviceOpt = None,
        seed: Annotated[int, typer.Option(help="Seed for the head's random draws.")] = 0,
        adapter: Annotated[
            Optional[str],
            typer.Option(help="Fit per task through the backbone, then fold into the weights (default: the bundle's own kind; "
                              "a fine-tuner fits its own head: --head/--head-opt do not apply). " + _adapter_help(False)),
        ] = None,
        steps: Annotated[Optional[int], typer.Option(min=1, help="Length of a per-task --adapter's fit; default: each kind's published one (" + _steps_help() + ").")] = None,
        domain: Annotated[Optional[str], typer.Option(help="--adapter tsa learning rates (URL/TSA): unseen (default) = α 0.5, β 1.0 (images unlike the backbone's training data); seen = α 0.05, β 0.1.")] = None,
        optimizer: Annotated[Optional[str], typer.Option(help="--adapter bn-affine optimiser: adadelta (default, lr 0.5) or olor (OLOR: Adam lr 1e-3, rollback towards the pretrained BN weights, 0.01 on the first layer decaying linearly to 0).")] = None,
        head_opt: Annotated[
            Optional[list[str]],
            typer.Option(help="Head option KEY=VALUE, repeatable, e.g. --head-opt optimizer=rollback (linear) or --head-opt distance=cosine (ncc); keys per head are listed above."),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (task, classes, head, timings in ms) instead of the summary line.")] = False,
        bn: Annotated[Optional[str], typer.Option(help="--adapter full-ft/partial-ft/maml BatchNorm while fitting: frozen (running statistics; the default of full-ft and partial-ft, as Chen et al.'s eval-mode features) or batch (batch statistics, MAML's default; running statistics updated and stored with the task).")] = None,
        lr: Annotated[Optional[float], typer.Option(help="--adapter full-ft/partial-ft/maml/ett learning rate instead of the recipe's (e.g. where the recipe's rate diverges).")] = None,
        spec: Annotated[Optional[Path], typer.Option(help="--adapter partial-ft layer spec (JSON from `python -m fsdeploy.train.partial_search`; default: last block + head).")] = None,
    ) -> None:
        from fsdeploy.adapters import ADAPTERS
        from fsdeploy.bundle import load_bundle
        from fsdeploy.commands.head_options import check_head_options, resolve_method
        from fsdeploy.errors import InvalidInput
        from fsdeploy.outputs import check_task_out
        from fsdeploy.runtime import adapt_task
        from fsdeploy.pipeline.tune import resolve_choice

        check_task_out(out)
        b = load_bundle(bundle)
        opts: dict[str, object] = {}
        if adapter and ADAPTERS.get(adapter).finetuner:
            if head != "linear" or transform != "none" or head_opt:
                raise InvalidInput(f"--adapter {adapter} fits its own head on the folded features; drop --head/--transform/--head-opt")
        else:
            head, transform = resolve_method(head, transform)
            opts = check_head_options(head, parse_options(head_opt or []))
        fit_opts = {k: v for k, v in (("domain", domain), ("optimizer", optimizer), ("spec", spec and str(spec)), ("bn", bn),
                                      ("lr", lr)) if v is not None}
        # a fine-tuner runs its own folded fp32 graph: a tuned choice does not apply to it
        tuner = bool(adapter) and ADAPTERS.get(adapter).finetuner
        choice = with_device(resolve_choice(b, backend or ("ort" if tuner else None), precision, threads=threads), device)
        if choice.note:
            err.print(choice.note)
        if tuner:
            kind = ADAPTERS.get(adapter)
            steps = kind.resolve_steps(steps)
        what = f"adapting ({adapter}: {steps} {kind.steps_unit} on the support set, then fold and re-export)" if tuner else "adapting"
        with progress_steps(err if as_json else console, what):
            task, t = adapt_task(
                b, support, out, adapter=adapter, head=head, transform=transform, backend=choice.backend, head_opts=opts,
                options=choice.options, batch=batch, seed=seed, steps=steps, fit_opts=fit_opts,
            )
        if as_json:
            from fsdeploy.commands.output import echo_json

            echo_json({"out": str(out), "classes": list(task.classes), "support": task.info["support"], "head": task.info["head"],
                       "adapter": task.info.get("adapter"), "backend": choice.backend, "precision": choice.options.precision,
                       "load_ms": t.load_ms, "features_ms": t.features_ms, "fit_ms": t.fit_ms, "write_ms": t.write_ms,
                       **({"adapt_macs": task.info["adapt_macs"], "fold_max_abs": task.info["fold_max_abs"]} if "adapt_macs" in task.info else {})})
            return
        if "adapt_macs" in task.info:
            console.print(
                f"{task.info['adapter']}: adaptation MACs {task.info['adapt_macs']:.3e} ({task.info['steps']} {ADAPTERS.get(task.info['adapter']).steps_unit} x forward+backward), "
                f"folded graph max |diff| {task.info['fold_max_abs']:.1e}; the task holds the folded graph and its weights"
            )
        console.print(
            f"wrote {out}: {len(task.classes)} classes, {task.info['support']} support images, head={task.info['head']} | "
            f"load {_duration(t.load_ms)}, features {_duration(t.features_ms)}, "
            + (f"{adapter} fit + fold + re-export {_duration(t.fit_ms)}" if tuner else f"fit {_duration(t.fit_ms)}")
            + f", write {_duration(t.write_ms)}"
        )

    @app.command()
    def predict(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
        task: Annotated[Path, typer.Argument(help="Task artefact from `fsdeploy adapt`.")],
        images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
        topk: Annotated[int, typer.Option(min=1, help="How many labels per image (at most the task's classes).")] = 1,
        backend: Annotated[Optional[str], typer.Option(help=BACKEND_HELP)] = None,
        precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP)] = None,
        batch: Annotated[int, typer.Option(min=1, help="Images per engine call.")] = 32,
        threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads for the engine and image decoding.")] = None,
        device: DeviceOpt = None,
        skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Classify the readable images and report each unreadable one (exit 1 if any); default: refuse the run, naming them.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines for machines; with --skip-bad an unreadable image is a line with an \"error\".")] = False,
    ) -> None:
        """Classify images with a stored task: top-k labels with probabilities."""
        from fsdeploy.commands.predict_safe import predict_or_report
        from fsdeploy.bundle import load_bundle
        from fsdeploy.runtime import TaskArtefact
        from fsdeploy.pipeline.tune import resolve_choice

        b = load_bundle(bundle)
        t = TaskArtefact.load(task)
        t.check_bundle(b, task)
        # a task with its own folded graph runs that graph (fp32): a tuned choice does not apply to it
        choice = resolve_choice(b, backend, precision, threads=threads) if "graph" not in t.task_state else resolve_choice(b, backend or "ort", precision, threads=threads)
        choice = with_device(choice, device)
        if choice.note:
            err.print(choice.note)
        preds, bad = predict_or_report(
            b, t, images, topk=topk, backend=choice.backend, options=choice.options, batch=batch, skip_bad=skip_bad or as_json,
        )
        if as_json:
            for p in preds:
                typer.echo(json.dumps({"image": p.image, "labels": list(p.labels), "probs": list(p.probs)}))
            for path, reason in bad:
                typer.echo(json.dumps({"image": path, "error": reason}))
        else:
            table = Table(title=f"predictions ({task.name})")
            table.add_column("image")
            table.add_column("top labels (probability)")
            for p in preds:
                table.add_row(p.image, ", ".join(f"{lab} ({pr:.3f})" for lab, pr in zip(p.labels, p.probs)))
            console.print(table)
        if bad:
            from fsdeploy.errors import InvalidInput

            raise InvalidInput(f"{len(bad)} unreadable image(s) skipped, first {bad[0][0]} ({bad[0][1]}); the other {len(preds)} were classified")
