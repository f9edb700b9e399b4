"""A frozen timm backbone with CaSE blocks, and the explicit-mode graphs cut from it.

UpperCaSE: Patacchiola et al., "Contextual Squeeze-and-Excitation for Efficient Few-Shot Image
Classification", NeurIPS 2022 (arXiv 2206.09843).

The backbone is traced once with torch.fx (the placement sites and every module that owns weights stay
leaves), and every mode is a rewrite of that one graph, so no mode is a flag flipped between calls (P6):

- context: images → (features, γ) — at each site, γ_i = CaseBlock_i(activation), then activation ⊙ γ_i;
  each block sees activations already scaled by the earlier blocks.
- query: (images, γ) → features — at each site, activation ⊙ γ[offset:offset+length].
- deploy context / deploy query: those graphs with each γ folded into the squeeze-and-excitation that
  follows its site (`fsdeploy.modules.scale_fusion`): the same function with one full-size multiply fewer
  per site. This is what the bundle exports; the plain modes stay the references it is validated against.
- stages: the deploy query graph cut right after each site (before its scaling; after the site's own
  spatial mean where the fusion added one, which is then carried instead of recomputed). Stage k maps the
  live state at cut k-1 (+ the whole γ, of which it reads γ_0..γ_{k-1}) to the live state at cut k plus
  `pooled`, the per-image spatial mean of site k's activation; the last stage ends in features. Chaining
  the stages with the right γ is the query graph; summing `pooled` over every chunk gives each site's
  exact context mean (see `fsdeploy.runtime.case_pass`).
- gamma: the concatenated per-site context means (G,) → γ (G,), every CaseBlock's MLP side by side.

Weights live once, in `backbone` and `cases`; the graph modules reference the same submodules.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import fx, nn

from fsdeploy.errors import InvalidInput
from fsdeploy.modules.case import CaseBlock, apply_gamma, spatial_mean
from fsdeploy.modules.placement import find_sites, placement_for
from fsdeploy.modules.scale_fusion import fuse_channel_scales, site_mean


@dataclass(frozen=True)
class GammaSlot:
    """Where one site's γ lies in the concatenated vector: `gamma[offset : offset + length]`."""

    name: str  # module name in the timm backbone whose output is scaled, e.g. "blocks.1.0.bn2"
    offset: int
    length: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Stage:
    """One graph of the chunked scheme: positional inputs/outputs named as in the exported ONNX graph."""

    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _owns_tensors(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))


def trace_backbone(backbone: nn.Module, leaves: Iterable[str]) -> fx.Graph:
    """fx graph of `backbone(images)`; `leaves`, timm's no-trace modules and weight owners stay single calls."""
    import timm.layers

    leaf_names = set(leaves)
    notrace = tuple(timm.layers.get_notrace_modules())

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return (
                qualname in leaf_names
                or isinstance(m, notrace)
                or _owns_tensors(m)
                or super().is_leaf_module(m, qualname)
            )

    funcs = tuple(f for f in timm.layers.get_notrace_functions() if callable(f))
    return _Tracer(autowrap_functions=funcs).trace(backbone)


class CaseNet(nn.Module):
    """`backbone` (frozen timm model, `num_classes=0`) with one CaseBlock per site of its family's rule.

    Args:
        backbone: the timm model; its weights are shared, not copied.
        family: timm family naming the placement rule (see `fsdeploy.modules.placement`).
        probe_size: image side used once to read each site's channel count.
    """

    def __init__(self, backbone: nn.Module, *, family: str, probe_size: int = 64) -> None:
        super().__init__()
        self.backbone = backbone
        self.family = family
        sites = find_sites(backbone, placement_for("case", family))
        graph = trace_backbone(backbone, sites)
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target in set(sites)]
        repeated = sorted({str(n.target) for n in calls if sum(c.target == n.target for c in calls) > 1})
        if repeated or len(calls) != len(sites):
            raise InvalidInput(
                f"CaSE sites must each run exactly once per forward, but {repeated or sites} do not in this "
                f"{type(backbone).__name__}; its family rule ({family}) does not fit it"
            )
        order = [str(n.target) for n in calls]  # execution order
        channels = _site_channels(backbone, order, probe_size)
        self.cases = nn.ModuleList(CaseBlock(c) for c in channels)
        offsets = [0]
        for c in channels:
            offsets.append(offsets[-1] + c)
        self.layout = tuple(GammaSlot(n, o, c) for n, o, c in zip(order, offsets, channels))
        self._graph = graph
        self.probe_size = probe_size
        self._built: dict[str, fx.GraphModule] = {}
        self._stages: list[Stage] | None = None

    @property
    def gamma_size(self) -> int:
        """G, the length of the concatenated γ."""
        return self.layout[-1].offset + self.layout[-1].length

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context mode: features `(N, D)` and γ `(G,)` of the context set `images`."""
        return self.context_module()(images)

    def query(self, images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """Query mode: features `(B, D)` of `images` under a fixed γ `(G,)`."""
        return self.query_module()(images, gamma)

    def context_module(self) -> nn.Module:
        """images → (features, gamma), as a module for export or autograd."""
        return self._cached("context", lambda: self._rewrite(context=True)[0])

    def query_module(self) -> nn.Module:
        """(images, gamma) → features."""
        return self._cached("query", lambda: self._rewrite(context=False)[0])

    def deploy_context_module(self) -> nn.Module:
        """images → (features, gamma), equal to `context_module` up to rounding; what the bundle exports."""
        return self._cached("deploy_context", lambda: self._deploy_rewrite(context=True)[0])

    def deploy_query_module(self) -> nn.Module:
        """(images, gamma) → features, equal to `query_module` up to rounding; what the bundle exports."""
        return self._cached("deploy_query", lambda: self._deploy_rewrite(context=False)[0])

    def gamma_module(self) -> nn.Module:
        """means `(G,)` (each site's context mean, concatenated) → γ `(G,)`."""
        return GammaFromMeans(self)

    def stages(self) -> list[Stage]:
        """The chunked-scheme graphs, in order (one more than there are sites)."""
        if self._stages is None:
            self._stages = _split_stages(self)
        return self._stages

    def _cached(self, key: str, build: Callable[[], fx.GraphModule]) -> fx.GraphModule:
        # graph modules hold references to this module's leaves (no copies), so caching them is safe
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def _rewrite(self, *, context: bool) -> tuple[fx.GraphModule, list[fx.Node], fx.Node | None]:
        """The graph in context or query mode; also returns the site nodes (pre-scaling) and the γ input."""
        index = {s.name: i for i, s in enumerate(self.layout)}
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        gammas: list[fx.Node] = []
        site_nodes: list[fx.Node] = []
        gamma_in = None
        for node in self._graph.nodes:
            if node.op == "placeholder":
                env[node] = g.placeholder("images")
                if not context:
                    gamma_in = g.placeholder("gamma")
                continue
            if node.op == "output":
                feats = fx.map_arg(node.args[0], env.__getitem__)
                g.output((feats, g.call_function(torch.cat, (gammas,))) if context else feats)
                continue
            new = g.node_copy(node, env.__getitem__)
            if node.op in ("call_module", "get_attr"):
                new.target = f"backbone.{node.target}"
            if node.op == "call_module" and node.target in index:
                slot = self.layout[index[node.target]]
                site_nodes.append(new)
                if context:
                    gam = g.call_module(f"cases.{index[node.target]}", (new,))
                else:
                    gam = g.call_function(operator.getitem, (gamma_in, slice(slot.offset, slot.offset + slot.length)))
                gammas.append(gam)
                new = g.call_function(apply_gamma, (new, gam))
            env[node] = new
        gm = fx.GraphModule(self, g, class_name="CaseContext" if context else "CaseQuery")
        return gm, site_nodes, gamma_in

    def _deploy_rewrite(self, *, context: bool) -> tuple[fx.GraphModule, list[fx.Node], fx.Node | None]:
        """`_rewrite` followed by the SE fold (`fsdeploy.modules.scale_fusion`), probed once for shapes."""
        gm, sites, gamma_in = self._rewrite(context=context)
        p = next(self.parameters())
        probe = [torch.zeros(1, 3, self.probe_size, self.probe_size, dtype=p.dtype, device=p.device)]
        if not context:
            probe.append(torch.ones(self.gamma_size, dtype=p.dtype, device=p.device))
        fuse_channel_scales(gm, *probe)
        return gm, sites, gamma_in


class GammaFromMeans(nn.Module):
    """Every CaseBlock's excitation side by side: concatenated context means `(G,)` → concatenated γ `(G,)`.

    Each block reads only its own slice, so a caller may fill the means site by site (chunked scheme).
    """

    def __init__(self, net: CaseNet) -> None:
        super().__init__()
        self.cases = net.cases
        self.slots = [(s.offset, s.offset + s.length) for s in net.layout]

    def forward(self, means: torch.Tensor) -> torch.Tensor:
        return torch.cat([case.gamma_from_mean(means[a:b]) for case, (a, b) in zip(self.cases, self.slots)])


def _site_channels(backbone: nn.Module, sites: list[str], size: int) -> list[int]:
    """Channel count of each site's output, read from one probe forward pass."""
    found: dict[str, int] = {}
    hooks = [
        backbone.get_submodule(s).register_forward_hook(lambda _m, _i, out, s=s: found.__setitem__(s, int(out.shape[1])))
        for s in sites
    ]
    try:
        with torch.no_grad():
            p = next(backbone.parameters())
            backbone(torch.zeros(1, 3, size, size, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return [found[s] for s in sites]


def _split_stages(net: CaseNet) -> list[Stage]:
    """Cut the deploy query graph after each site node (before its scaling) into K + 1 stage modules."""
    gm, sites, gamma_in = net._deploy_rewrite(context=False)
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}

    def live_after(p: int) -> list[fx.Node]:
        return [
            n for n in nodes[: p + 1]
            if n is not gamma_in and n.op != "output" and any(pos[u] > p for u in n.users)
        ]

    means = [site_mean(s) for s in sites]  # the fusion's mean_hw(site): computed before the cut, carried
    cuts = [pos[m if m is not None else s] for s, m in zip(sites, means)]
    bounds = [-1, *cuts, len(nodes) - 1]
    stages: list[Stage] = []
    for k in range(len(bounds) - 1):
        start, end = bounds[k], bounds[k + 1]
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if k == 0:
            inputs = ("images",)
        else:
            carried = live_after(start)
            inputs = (*(f"state{k - 1:02d}_{j}" for j in range(len(carried))), "gamma")
            for j, n in enumerate(carried):
                env[n] = g.placeholder(inputs[j])
            env[gamma_in] = g.placeholder("gamma")  # type: ignore[index]
        for n in nodes[start + 1 : end + 1]:
            if n is gamma_in:
                continue
            if n.op == "placeholder":
                env[n] = g.placeholder(str(n.target))
            elif n.op == "output":
                g.output(fx.map_arg(n.args[0], env.__getitem__))
            else:
                env[n] = g.node_copy(n, env.__getitem__)
        if k < len(cuts):
            carried_out = live_after(end)
            m = means[k]
            pooled = (
                g.call_function(torch.flatten, (env[m], 1)) if m is not None
                else g.call_function(spatial_mean, (env[sites[k]],))
            )
            g.output((pooled, *(env[n] for n in carried_out)))
            outputs = ("pooled", *(f"state{k:02d}_{j}" for j in range(len(carried_out))))
        else:
            outputs = ("features",)
        if any(n.op == "placeholder" and n.target == "gamma" and not n.users for n in g.nodes):
            raise InvalidInput(f"CaSE stage {k} does not read gamma; the cut points are inconsistent for this model")
        stages.append(Stage(fx.GraphModule(net, g, class_name=f"CaseStage{k:02d}"), inputs, outputs))
    return stages


def run_stages_torch(
    net: CaseNet, chunks: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked context scheme in torch (the reference the exported stages are checked against).

    Returns:
        features `(N, D)`, γ `(G,)`, and the per-site context means `(G,)` concatenated.
    """
    stages, to_gamma = net.stages(), net.gamma_module()
    means = torch.zeros(net.gamma_size, dtype=torch.float64)
    gamma = torch.ones(net.gamma_size)
    states: list[tuple[torch.Tensor, ...]] = []
    count = 0
    with torch.no_grad():
        for k, stage in enumerate(stages):
            total = None
            for j, chunk in enumerate(chunks if k == 0 else list(states)):
                out = stage.module(chunk) if k == 0 else stage.module(*chunk, gamma)
                if k == len(stages) - 1:
                    states[j] = (out,)
                    continue
                pooled, *rest = out
                total = pooled.double().sum(0) if total is None else total + pooled.double().sum(0)
                if k == 0:
                    states.append(tuple(rest))
                    count += pooled.shape[0]
                else:
                    states[j] = tuple(rest)
            if k < len(net.layout):
                slot = net.layout[k]
                means[slot.offset : slot.offset + slot.length] = total / count  # type: ignore[operator]
                new = to_gamma(means.float())
                gamma[slot.offset : slot.offset + slot.length] = new[slot.offset : slot.offset + slot.length]
    return torch.cat([s[0] for s in states]), gamma, means.float()
