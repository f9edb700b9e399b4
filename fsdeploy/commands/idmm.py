"""`fsdeploy pretrain NAME --recipe idmm`: the run and its printout (called from fsdeploy.commands.train)."""
from __future__ import annotations

import json
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fsdeploy.commands.output import out_console

console = out_console()


def run_idmm(*, model: str, data: Path, out: Path, img_size: int, epochs: int, batch_size: int, lr: float | None,
             weight_decay: float | None, label_smoothing: float, cutmix_alpha: float, crops: str, max_steps: int | None,
             seed: int, device: str | None, threads: int | None, fp16: bool, as_json: bool = False) -> None:
    """Build the IDMM config from CLI values (None = the official value), train, print a summary."""
    from fsdeploy.train.idmm import IdmmConfig, IdmmEpoch, idmm_pretrain, parse_crops

    defaults = IdmmConfig(model, data, out)
    cfg = IdmmConfig(model=model, data=data, out=out, img_size=img_size, epochs=epochs, batch_size=batch_size,
                     lr=defaults.lr if lr is None else lr,
                     weight_decay=defaults.weight_decay if weight_decay is None else weight_decay,
                     label_smoothing=label_smoothing, cutmix_alpha=cutmix_alpha, crops=parse_crops(crops),
                     max_steps=max_steps, seed=seed, device=device, threads=threads, fp16=fp16)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"))
    with Progress(*columns, console=console, disable=as_json) as bar:
        task = bar.add_task(f"IDMM {model}", total=None, loss=float("nan"))

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=loss)

        def on_epoch(s: IdmmEpoch) -> None:
            if not as_json:
                bar.console.print(f"epoch {s.epoch}: loss {s.loss:.3f}, instance acc {s.accuracy:.3f}, lr {s.lr:.2e} ({s.seconds:.0f} s)")

        result = idmm_pretrain(cfg, on_step=on_step, on_epoch=on_epoch)
    if as_json:
        print(json.dumps({"checkpoint": str(result.checkpoint), "recipe": "idmm", "images": result.images, "steps": result.steps,
                          "final_loss": result.history[-1].loss if result.history else None, "seconds": round(result.seconds, 1)}))
        return
    console.print(f"wrote {result.checkpoint}: {model} pretrained by instance discrimination on {result.images} unlabelled "
                  f"images ({result.images} instance classes), {result.steps} steps, data sha256 {result.data_sha256[:16]}, "
                  f"{result.seconds / 60:.1f} min")
