"""How each adapter kind turns images into features on the device, through engines only.

A feature path has two halves: `support` runs once per task (and may produce task state, e.g. CaSE's
γ), `query` runs per request with that state. Which path a bundle uses is its adapter kind's
(`fsdeploy.adapters.AdapterKind.feature_path`); a task that carries its own folded graph (TSA, BN-affine)
uses `TaskGraphPath` on any backend that opens ONNX, or the folded torch module on `torch`.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from fsdeploy.bundle import Bundle, GraphSource, TorchModule
from fsdeploy.engines import EngineOptions, backend_info, open_engine
from fsdeploy.errors import BundleError, InvalidInput, UnknownName
from fsdeploy.runtime.open import GraphOpener, torch_graphs


class FeaturePath(Protocol):
    def support(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Features `(N, D)` of all support batches, and the task state to store."""
        ...

    def query(self, images: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        """Features `(B, D)` of one query batch given the stored task state."""
        ...

    def support_batch(self, images: int, batch: int) -> int:
        """Images per batch `support` should get for a set of `images` (`batch`: the caller's engine batch)."""
        ...

    def close(self) -> None: ...


def _concat(feats: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)


class PlainPath:
    """One `features` graph for support and query (adapter none, toast)."""

    def __init__(self, bundle: Bundle, backend: str, options: EngineOptions) -> None:
        self.engines = GraphOpener(bundle, backend, options)

    def support(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return _concat([self.query(b, {}) for b in batches]), {}

    def query(self, images: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        return self.engines("features").run({"images": images})["features"]

    def support_batch(self, images: int, batch: int) -> int:
        return batch

    def close(self) -> None:
        self.engines.close()


STAGE_PUBLIC_IO = ("images", "gamma", "pooled", "features")
# Backends on which the one-batch `context` graph beats the chunked stages for support sets that fit, and the
# memory it may take, as the f32 state of the largest cut over the whole set (`state_floats_per_image`):
# OpenVINO bf16, efficientnet_b0 at 224 px, 100 images, 1 thread: 0.9 s one batch against 1.3 s chunked
# (ONNX Runtime FP32: 1.9 s against 1.4 s, so it stays chunked). 288 MiB is 143 images at 224 px.
ONE_BATCH_STATE_MIB = {"openvino": 288}


def one_batch_limit(backend: str, layout: Any) -> int:
    """Most support images the `context` graph runs in one batch on `backend` (0: always chunk several batches)."""
    budget = ONE_BATCH_STATE_MIB.get(backend, 0)
    per_image = max(layout.state_floats_per_image or (0,)) * 4
    return int(budget * 2**20 // per_image) if budget and per_image else 0


class CasePath:
    """UpperCaSE: the context pass over all support batches gives γ; queries feed γ to the query graph.

    Args:
        keep_warm: keep the support pass's engines (the context graph or the stage chain and the γ graph) and the
            stage state buffers open after a task, so the next task skips opening them and page-faulting their
            activation memory in again. False: each is released as soon as the pass no longer needs it.
        support_size: the support-set size most tasks will have: engines that compile static shapes (OpenVINO)
            also compile the one-batch context graph for exactly that many images and run it for such sets
            (`EngineOptions.static_batch`). Worth it in a warm session only: it is a second compile.
    """

    def __init__(self, bundle: Bundle, backend: str, options: EngineOptions, *, chunked: bool | None = None,
                 keep_warm: bool = False, support_size: int | None = None) -> None:
        self.layout = bundle.manifest.case_layout()
        # One-shot passes: the stage graphs run back to back and each is released as the pass moves on, so their
        # ORT workers may busy-wait between runs without stealing the cores from later work (10-15% faster, 100
        # images). A warm session keeps all of them open: a stage left spinning after its run would take a core
        # from the next stage (measured at 2 threads: warm 1.20 s per task against 0.92 s cold), so there they
        # stop spinning when their run returns, like every other session.
        # Their state passes only from stage to stage, so an engine may keep it in its compute precision and layout
        # (OpenVINO at bf16: bf16 NHWC, no reorder + conversion at each cut); images, γ, pooled means and features
        # keep the graphs' f32 NCHW.
        height = int(bundle.manifest.preprocess.input_size[-2])  # stages past the first start mid-network
        spinning = options.spinning or ("run" if keep_warm else "always")
        overrides = {name: replace(options, spinning=spinning, public_io=STAGE_PUBLIC_IO, image_height=height)
                     for name in self.layout.stages}
        # The one-batch context graph takes the mean over its whole batch: an engine must never split that batch
        # across parallel requests (OpenVINO's THROUGHPUT hint does, e.g. after `fsdeploy tune --batch 16`), or
        # each part gets its own γ. Stages and the query graph are per image and may be split.
        self.chunked = chunked
        self.one_batch_up_to = one_batch_limit(backend, self.layout) if self.layout.chunked else 0
        # a fixed-shape context graph only for a size the context graph will take in one run (a set past the
        # one-batch limit streams through the stages: compiling for it would be wasted)
        static = support_size if support_size and chunked is not True and (
            chunked is False or not self.one_batch_up_to or support_size <= self.one_batch_up_to) else None
        overrides["context"] = replace(options, hint="latency", static_batch=static)
        self.engines = GraphOpener(bundle, backend, options, overrides)
        self.keep_warm = keep_warm
        self._store: Any = None  # the warm stage state buffers (keep_warm only)

    def support(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        from fsdeploy.runtime.case_pass import StateStore, context_pass

        if self.keep_warm and self._store is None and self.layout.chunked:
            self._store = StateStore(max(self.layout.state_floats_per_image or (0,)))
        feats, gamma = context_pass(self.engines, batches, self.layout, chunked=self.chunked,
                                    release=None if self.keep_warm else self.engines.release,
                                    one_batch_up_to=self.one_batch_up_to, store=self._store)
        return feats, {"gamma": gamma}

    def support_batch(self, images: int, batch: int) -> int:
        """The whole set as one batch when the pass will run the one-batch context graph on it anyway (decoded
        straight into that batch: no copy of 60 MB per 100 images at 224 px), else `batch`."""
        one_batch = self.chunked is False or self.chunked is None and images <= max(self.one_batch_up_to, batch)
        return max(images, 1) if one_batch else batch

    def query(self, images: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        from fsdeploy.runtime.case_pass import query_pass

        return query_pass(self.engines("query"), images, state["gamma"], self.layout)

    def close(self) -> None:
        self.engines.close()
        self._store = None


class TaskGraphPath:
    """A task that carries its own folded weights (TSA / BN-affine): support and query both use them.

    Backends that open ONNX run the task's re-exported graph; `torch` runs the bundle's plain module with
    the task's weights applied (`fsdeploy.modules.fold.TaskWeights`).
    """

    def __init__(self, bundle: Bundle, task_state: dict[str, np.ndarray], backend: str, options: EngineOptions) -> None:
        kind = backend_info(backend).kind
        if kind == "onnx":
            source = GraphSource("task", data=task_state["graph"].tobytes())
        elif kind == "torch":
            info = bundle.manifest.graphs["features"]  # the folded graph is the plain one with new weights
            source = GraphSource("task", "torch", torch=TorchModule(lambda: folded_module(bundle, task_state), ("images",), ("features",)),
                                 inputs=info.inputs, outputs=info.outputs)
        else:
            raise InvalidInput(
                f"tasks with folded weights run their own ONNX graph or the folded torch module; --backend {backend} "
                "opens neither (use ort, or torch)"
            )
        self.engine = open_engine(source, backend, options)

    def support(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return _concat([self.query(b, {}) for b in batches]), {}

    def query(self, images: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        return self.engine.run({"images": images})["features"]

    def support_batch(self, images: int, batch: int) -> int:
        return batch

    def close(self) -> None:
        self.engine.close()


def folded_module(bundle: Bundle, task_state: dict[str, np.ndarray]) -> Any:
    """The bundle's plain torch backbone with a folded task's weights applied."""
    from fsdeploy.modules.fold import TaskWeights

    if not any(k.startswith(("delta/", "set/")) for k in task_state):
        raise BundleError("this folded task was written before tasks carried their weights (only its ONNX graph); "
                          "run it on --backend ort, or re-run `fsdeploy adapt` to use --backend torch")
    plain = torch_graphs(bundle)["features"].module
    weights = TaskWeights.from_arrays(task_state)
    module = copy.deepcopy(plain)
    module.load_state_dict(weights.apply(plain.state_dict()))
    from fsdeploy.modules.ett import PREFIX_KEY

    if PREFIX_KEY in task_state:  # eTT: the ViT with its prefix keys/values in every block
        import torch

        from fsdeploy.modules.ett import PrefixTaskGraph

        return PrefixTaskGraph(module.eval(), torch.from_numpy(np.asarray(task_state[PREFIX_KEY]))).eval()
    return module.eval()


def feature_path(
    bundle: Bundle,
    backend: str = "ort",
    options: EngineOptions | None = None,
    task_state: dict[str, np.ndarray] | None = None,
    **kw: Any,
) -> FeaturePath:
    """The feature path for the bundle's adapter kind, or the task's own folded weights when it has them."""
    from fsdeploy.adapters import ADAPTERS

    options = options or EngineOptions()
    if task_state and "graph" in task_state:
        if options.precision != "fp32":
            raise UnknownName(f"tasks with folded weights run their own fp32 graph; drop --precision {options.precision}")
        return TaskGraphPath(bundle, task_state, backend, options)
    kind = ADAPTERS.get(bundle.manifest.adapter, f"bundle {bundle.path} was exported by another fsdeploy; re-export it")
    if kind.feature_path is None:
        raise InvalidInput(f"bundle {bundle.path} has adapter {kind.name}, which has no feature path; re-export it")
    return kind.feature_path(bundle, backend, options, **kw)
