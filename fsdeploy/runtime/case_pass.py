"""The CaSE runtime on engines: the exact context pass over support sets of any size, and the query pass.

UpperCaSE: Patacchiola et al., NeurIPS 2022 (arXiv 2206.09843).

Why a chunked scheme: γ_i is a function of the mean of site i's activation over *every* support image,
and that activation already depends on γ_0..γ_{i-1}. Running the one-batch `context` graph per chunk
would give each chunk its own γ; keeping the last chunk's γ would be wrong. The exact scheme:

1. `stage_00` runs on every chunk of images. It returns each chunk's state at cut 0 (the tensors still
   needed after site 0, including site 0's unscaled activation) and `pooled`, the per-image spatial
   mean of site 0's activation `(n, C_0)`.
2. Summing `pooled` over all chunks (float64) and dividing by N gives the exact context mean z_0 (every
   image has the same H x W, so the mean of per-image means is the mean over batch and space).
   `case_gamma` maps the means to γ; only γ_0's slice is final so far.
3. `stage_k` (k ≥ 1) takes a chunk's state at cut k-1 and the whole γ vector (it reads only the final
   slices γ_0..γ_{k-1}), applies γ_{k-1}, runs to site k and returns the state at cut k and `pooled`.
   Each chunk's old state is dropped as soon as its new one exists, so at most one cut's state (plus
   one chunk) is held at a time.
4. The last stage returns the features of each chunk; the concatenated γ is the task state.

The arithmetic per image is the (deploy) query graph's, so features and γ equal the one-batch context
graph's up to float rounding of the mean (tested ≤ 1e-5). Where a site feeds a squeeze-and-excitation
(EfficientNet), the stage also carries the site's per-image mean `(n, C, 1, 1)` and `pooled` is that mean,
so stage k+1 does not re-read the site's activation for it (`fsdeploy.modules.scale_fusion`).

Memory: the manifest records the floats per image held at each cut (`chunked.state_floats_per_image`).
efficientnet_b0 at 224 px peaks at cut 3 (after blocks.1.1's depthwise activation, plus the block's
shortcut and the site's mean) with 527,136 floats = 2.1 MB per image, so 500 support images hold
0.98 GiB of state at the worst cut; a chunk's buffer is reused by the next chunk as soon as its new state
exists (`StateStore`), so two cuts never coexist in full. Measured peak RSS of `fsdeploy adapt` on 500
images at 224 px (chunks of `STAGE_CHUNK` = 4, ONNX Runtime CPU with its arena, each stage engine released
after use through `release`): 1,436-1,445 MiB over three runs of `fsdeploy bench perf --targets 4`.
"""
from __future__ import annotations

import mmap
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fsdeploy.bundle.manifest import CaseLayout
from fsdeploy.engines.base import Engine
from fsdeploy.errors import BundleError, InvalidInput

OpenGraph = Callable[[str], Engine]
# Images per stage run. Measured on efficientnet_b0 at 224 px, 100 support images, 2 cores, ORT with its
# memory arena: chunks of 4-8 take 1.8-2.1 s, 16: 2.3 s, 32: 3.4 s (the 32-image run's activations
# spill the caches and page-fault in each time); the one-batch graph on all 100 takes 1.7-2.7 s. With the
# SE fold (`scale_fusion`), three interleaved runs of 4 against 8 gave 1.59 vs 1.75, 1.75 vs 1.90 and 1.99
# vs 2.17 s (medians of 5-8); 2, 3, 6, 12 and 16 were slower than 4.
STAGE_CHUNK = 4


def _opener(graphs: OpenGraph | Mapping[str, Engine]) -> OpenGraph:
    if isinstance(graphs, Mapping):
        return lambda name: _lookup(graphs, name)
    return graphs


def _lookup(graphs: Mapping[str, Engine], name: str) -> Engine:
    if name not in graphs:
        raise BundleError(f"no engine for CaSE graph {name!r}; have {', '.join(sorted(graphs))}")
    return graphs[name]


def _case_layout(layout: CaseLayout | Mapping[str, Any]) -> CaseLayout:
    return layout if isinstance(layout, CaseLayout) else CaseLayout.from_extra(layout, "this CaSE bundle")


def _chunked_info(layout: CaseLayout) -> tuple[list[str], str]:
    if not layout.chunked:
        raise BundleError(
            "this CaSE bundle has no chunked context graphs; re-export it with `fsdeploy export MODEL --adapter case`"
        )
    return list(layout.stages), layout.gamma_graph


def _check_images(images: np.ndarray) -> NDArray[np.float32]:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise InvalidInput(f"expected a batch of images (N, 3, H, W) with N >= 1, got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def context_pass(
    graphs: OpenGraph | Mapping[str, Engine],
    image_batches: Iterable[np.ndarray],
    manifest_extra: CaseLayout | Mapping[str, Any],
    *,
    chunked: bool | None = None,
    release: Callable[[str], None] | None = None,
    chunk: int | None = None,
    one_batch_up_to: int = 0,
    store: StateStore | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Support features and the task's γ from all support batches, exactly as one batch would give them.

    Args:
        graphs: `open_graph(name) -> Engine` (e.g. the runtime's engine cache) or engines by graph name.
        image_batches: preprocessed support images `(n, 3, H, W)` per batch, each at most one engine batch;
            consumed once, so a generator reading from disk keeps memory flat.
        manifest_extra: the bundle's `CaseLayout` (or its manifest `extra`, read as one).
        chunked: None = the one-batch `context` graph when there is a single batch, the chunked stages
            otherwise; True = always chunked; False = concatenate every batch into one `context` run.
        release: called with a graph name once the pass no longer needs it (each stage as the chunked pass
            moves on, then the γ graph; the `context` graph after its one run), so a caller that caches
            engines frees them and their activation memory. None keeps every engine open (a warm session).
        chunk: most images per stage run in the chunked pass (default `STAGE_CHUNK`); bigger batches
            are split. Small chunks keep each run's activations in cache (see `STAGE_CHUNK`).
        one_batch_up_to: with `chunked=None`, support sets of at most this many images (over all batches)
            run the one-batch `context` graph even when they come in several batches; larger ones stream
            through the chunked stages. The batches are held until the count passes the limit, so memory
            stays bounded by it. 0: decide by the number of batches alone.
        store: the buffers of the chunks' states; a caller that adapts many tasks passes the same store each
            time so its pages are faulted in once (a warm session), None: a new store freed with the pass.

    Returns:
        features `(N, D)` float32 and γ `(G,)` float32.

    Raises:
        InvalidInput: no images, or a batch that is not `(n, 3, H, W)`.
        BundleError: the manifest lacks the CaSE layout or chunked graphs.
    """
    open_graph = _opener(graphs)
    batches = iter(image_batches)
    first = next(batches, None)
    if first is None:
        raise InvalidInput("the support set is empty; give at least one image per class")
    second = next(batches, None)
    if chunked is None and second is not None and one_batch_up_to > 0:
        held, count = [first, second], len(first) + len(second)
        while count <= one_batch_up_to:
            nxt = next(batches, None)
            if nxt is None:
                break
            held.append(nxt)
            count += len(nxt)
        chunked = count > one_batch_up_to
        first, second, batches = held[0], held[1], _chain_all(held[2:], batches)
    if chunked is None:
        chunked = second is not None
    rest = _chain(first, second, batches)
    if not chunked:
        parts = [_check_images(b) for b in rest]
        images = parts[0] if len(parts) == 1 else np.concatenate(parts)
        out = open_graph("context").run({"images": images})
        if release is not None:
            release("context")
        return out["features"], out["gamma"]
    size = STAGE_CHUNK if chunk is None else int(chunk)
    if size < 1:
        raise InvalidInput(f"chunk must be >= 1 image, got {chunk}")
    return _chunked_context(open_graph, _split(rest, size), manifest_extra, release, store)


def _split(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    for batch in batches:
        arr = _check_images(batch)
        for start in range(0, arr.shape[0], size):
            yield arr[start : start + size]


def _chain_all(held: list[np.ndarray], rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield from held
    yield from rest


def _chain(first: np.ndarray, second: np.ndarray | None, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    if second is not None:
        yield second
        yield from rest


def _chunked_context(
    open_graph: OpenGraph,
    batches: Iterable[np.ndarray],
    extra: Mapping[str, Any],
    release: Callable[[str], None] | None,
    store: StateStore | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    layout = _case_layout(extra)
    stages, gamma_graph = _chunked_info(layout)
    slots = [(s.offset, s.stop) for s in layout.slices]
    size = slots[-1][1]
    means = np.zeros(size, dtype=np.float32)
    gamma = np.ones(size, dtype=np.float32)  # slices become final one site at a time
    store = store if store is not None else StateStore(max(layout.state_floats_per_image or (0,)))
    chunks: list[tuple[int, dict[str, np.ndarray], mmap.mmap | None]] = []  # (images, state, its buffer)
    feats: NDArray[np.float32] | None = None
    n_images = 0
    for k, name in enumerate(stages):
        engine = open_graph(name)
        pooled_width = slots[k][1] - slots[k][0] if k < len(slots) else 0
        total = np.zeros(pooled_width, dtype=np.float64)
        inputs = batches if k == 0 else chunks
        chunks_next: list[tuple[int, dict[str, np.ndarray], mmap.mmap | None]] = []
        if k == len(stages) - 1:
            feats = np.empty((n_images, _static_width(engine, "features")), dtype=np.float32)
        row = 0
        for item in inputs:
            if k == 0:  # images, already checked by `_split`
                n, feeds, old = item.shape[0], {"images": item}, None  # type: ignore[union-attr]
                n_images += n
            else:
                n, state, old = item  # type: ignore[misc]
                feeds = {**state, "gamma": gamma}
            outs, buf = store.outputs(engine, n, pooled_width, feats[row : row + n] if feats is not None else None)
            engine.run_into(feeds, outs)
            store.give(old)  # this chunk's previous state is no longer needed
            if "pooled" in outs:
                total += outs.pop("pooled").sum(0, dtype=np.float64)
            outs.pop("features", None)
            chunks_next.append((n, outs, buf))
            row += n
        chunks = chunks_next
        if release is not None:
            release(name)
        if k < len(slots):
            a, b = slots[k]
            means[a:b] = (total / n_images).astype(np.float32)
            gamma[a:b] = open_graph(gamma_graph).run({"means": means})["gamma"][a:b]
    if release is not None:
        release(gamma_graph)
    assert feats is not None
    return feats, gamma


def _static_width(engine: Engine, output: str) -> int:
    width = engine.output_specs()[output].shape[-1]
    if not isinstance(width, int):
        raise BundleError(f"{engine.name}: output {output!r} has no static width ({width!r}); re-export the bundle")
    return width


class StateStore:
    """Page-backed buffers for the chunks' states, reused from cut to cut.

    Why: the state of every chunk at one cut is the pass's peak memory, and it is rewritten at every cut.
    Freshly allocated buffers page-fault on first touch each time (measured: as much system time as
    compute on 100 images at 224 px); buffers handed back are reused by the next chunk, so each page is
    faulted in once per pass. Every buffer is sized for the largest cut (manifest
    `state_floats_per_image`), so any freed buffer fits the next chunk and at most one more buffer than
    there are chunks exists: one cut's state plus one chunk, as before. They are separate anonymous
    mappings (transparent huge pages where the kernel allows), unmapped as soon as the pass drops them.
    """

    ALIGN = 64

    def __init__(self, floats_per_image: int = 0) -> None:
        self.free: list[mmap.mmap] = []
        self.floats_per_image = int(floats_per_image)  # the largest cut's; every buffer fits any cut
        self.most_images = 0
        self._layouts: dict[tuple[str, int], tuple[list[tuple[str, tuple[int, ...], np.dtype, int, int]], int]] = {}

    def take(self, nbytes: int, n_images: int = 0) -> mmap.mmap:
        fits = [b for b in self.free if len(b) >= nbytes]
        if fits:
            buf = min(fits, key=len)
            self.free.remove(buf)
            return buf
        self.most_images = max(self.most_images, n_images)  # a short last chunk's buffer fits a full one later
        capacity = self.most_images * self.floats_per_image * 4 + 16 * self.ALIGN
        buf = mmap.mmap(-1, max(nbytes, capacity, mmap.PAGESIZE))
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                buf.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # kernels without transparent huge pages
                pass
        return buf

    def give(self, buf: mmap.mmap | None) -> None:
        if buf is not None:
            self.free.append(buf)

    def outputs(
        self, engine: Engine, n: int, pooled_width: int, features: np.ndarray | None
    ) -> tuple[dict[str, np.ndarray], mmap.mmap | None]:
        """Output arrays for one run of `engine` on `n` images: state tensors carved from one buffer of this
        store, `pooled` (n, pooled_width), `features` as the given rows of the pass's feature matrix."""
        names = engine.output_specs().keys()
        outs: dict[str, np.ndarray] = {}
        if "pooled" in names:
            outs["pooled"] = np.empty((n, pooled_width), dtype=np.float32)
        if "features" in names:
            if features is None:
                raise BundleError(f"{engine.name} returns features before the last stage; re-export the bundle")
            outs["features"] = features
        layout, nbytes = self._layout(engine, n)
        if not layout:
            return outs, None
        buf = self.take(nbytes, n)
        for name, shape, dtype, count, offset in layout:
            outs[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
        return outs, buf

    def _layout(self, engine: Engine, n: int) -> tuple[list[tuple[str, tuple[int, ...], np.dtype, int, int]], int]:
        """(name, shape, dtype, elements, byte offset) of each state output of `engine` for `n` images, and the
        bytes they take; worked out once per graph and chunk size (the chunked pass asks 20 graphs x chunks times).
        The engine decides shape and dtype (f32 NCHW from the graph; OpenVINO at bf16 gives bf16 NHWC state as
        uint16 bits, `fsdeploy.engines.EngineOptions.public_io`): the pass only carries them to the next stage."""
        key = (engine.name, n)
        if key not in self._layouts:
            layout, nbytes = [], 0
            for name, spec in engine.output_specs().items():
                if name in ("pooled", "features"):
                    continue
                rest = spec.shape[1:]
                if not all(isinstance(d, int) for d in rest):
                    raise BundleError(f"{engine.name}: state {name!r} has dynamic dims {spec.shape}; re-export the bundle")
                shape = (n, *rest)
                count = int(np.prod(shape))
                dtype = np.dtype(spec.dtype)
                layout.append((name, shape, dtype, count, nbytes))
                nbytes += -(-count * dtype.itemsize // self.ALIGN) * self.ALIGN
            self._layouts[key] = (layout, nbytes)
        return self._layouts[key]


def query_pass(
    engine: Engine,
    images: np.ndarray,
    gamma: np.ndarray,
    manifest_extra: CaseLayout | Mapping[str, Any] | None = None,
) -> NDArray[np.float32]:
    """Features `(B, D)` of query `images` under the task's γ, through the `query` graph.

    Raises:
        InvalidInput: γ is not a vector of the length this bundle's query graph takes.
    """
    g = np.asarray(gamma, dtype=np.float32)
    want = engine.input_specs()["gamma"].shape[0] if "gamma" in engine.input_specs() else None
    if isinstance(manifest_extra, CaseLayout):
        want = manifest_extra.gamma_size
    elif manifest_extra is not None and "gamma_size" in manifest_extra:
        want = int(manifest_extra["gamma_size"])
    if g.ndim != 1 or (isinstance(want, int) and g.shape[0] != want):
        raise InvalidInput(
            f"gamma has shape {g.shape}, but this bundle's query graph takes a vector of {want} values "
            "(one per CaSE channel); it must come from `adapt` on this same bundle — re-run adapt"
        )
    return engine.run({"images": _check_images(images), "gamma": g})["features"]


def batches_of(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Split `(N, 3, H, W)` into consecutive batches of at most `size` images."""
    if size < 1:
        raise InvalidInput(f"batch size must be >= 1, got {size}")
    for start in range(0, len(images), size):
        yield images[start : start + size]
