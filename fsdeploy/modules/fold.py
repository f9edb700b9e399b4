"""Fold per-task adaptation into the plain backbone's weights, so the deployed graph never changes.

TSA (Li, Liu, Bilen, CVPR 2022): a residual adapter computes conv(x) + alpha(x) with alpha a 1x1 conv of the
same stride and groups. The 1x1 conv reads the pixel under the k x k kernel's centre tap (padding
d*(k-1)/2), so conv(x) + alpha(x) == conv'(x) with W' = W, W'[:, :, k//2, k//2] += alpha[:, :, 0, 0]. This is
exact (one extra addition per weight, no approximation); `check_foldable` refuses every case where it is not.

BN-affine: fine-tuning BatchNorm's weight/bias (running statistics frozen) changes values, not structure, so
its "fold" is writing the new BN weight/bias into the plain state dict: the same graph as the plain
backbone, and the ONNX exporter's Conv+BN fusion then bakes them into conv weights and biases. (Folding BN
fully into conv weight + bias in the state dict would add `conv.bias` keys the plain timm graph lacks.)

A `TaskWeights` artefact carries only what a task changes: alpha as centre-tap deltas keyed by the conv's
state-dict weight name, replaced tensors (BN weight/bias), and beta. `apply` turns it plus the plain
state dict into the folded state dict; `changed_weights` gives the full new tensors (e.g. for a refit).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from fsdeploy.atomic import save_npz
from fsdeploy.errors import BundleError, InvalidInput
from fsdeploy.modules.adapters import ResidualAdapterConv, adapters_of, centre_tap_problem

F32 = NDArray[np.float32]
_FORMAT_KEY = "fsdeploy_task_weights"
_FORMAT_VERSION = 1


def check_foldable(adapter: ResidualAdapterConv, name: str = "adapter") -> None:
    """Raise InvalidInput unless folding `adapter.alpha` into `adapter.conv` reproduces it exactly.

    Conditions: the conv's centre tap lines up with a 1x1 conv (`centre_tap_problem`), and alpha is a plain
    bias-free 1x1 conv with the conv's stride, groups and channel counts and no padding.
    """
    conv, alpha = adapter.conv, adapter.alpha
    problem = centre_tap_problem(conv)
    if problem is None:
        expected = (conv.out_channels, conv.in_channels // conv.groups, 1, 1)
        if type(alpha) is not nn.Conv2d or alpha.bias is not None:
            problem = "alpha is not a plain bias-free Conv2d"
        elif tuple(alpha.weight.shape) != expected:
            problem = f"alpha has shape {tuple(alpha.weight.shape)}, the conv needs {expected}"
        elif tuple(alpha.stride) != tuple(conv.stride):
            problem = f"alpha has stride {tuple(alpha.stride)} but the conv {tuple(conv.stride)}"
        elif alpha.groups != conv.groups:
            problem = f"alpha has groups={alpha.groups} but the conv groups={conv.groups}"
        elif tuple(alpha.padding) != (0, 0):
            problem = f"alpha has padding {tuple(alpha.padding)}; a 1x1 adapter must have none"
    else:
        problem = f"the conv {problem}"
    if problem:
        raise InvalidInput(f"cannot fold {name} exactly: {problem}; rebuild the adapters with with_adapters()")


def fold_centre_tap(weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """W' = W with alpha (C_out, C_in/groups[, 1, 1]) added to the kernel's centre tap; W is not modified."""
    kh, kw = weight.shape[-2:]
    delta = alpha.reshape(weight.shape[0], weight.shape[1])
    if kh % 2 == 0 or kw % 2 == 0:
        raise InvalidInput(f"cannot fold into a {kh}x{kw} kernel: even kernels have no centre tap")
    folded = weight.detach().clone()
    folded[:, :, kh // 2, kw // 2] += delta.to(folded.dtype)
    return folded


def folded_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain backbone's state dict with every adapter folded in (CPU tensors, detached).

    Keys are those of the backbone without adapters ("layer1.0.conv1.weight", no "alpha"), so the result
    loads with `load_state_dict(strict=True)` into a freshly created plain timm model. A model without
    adapters (e.g. after BN-affine fitting) is returned as its own state dict.

    Raises:
        InvalidInput: an adapter cannot be folded exactly.
    """
    adapters = adapters_of(model)
    for name, adapter in adapters.items():
        check_foldable(adapter, name)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = next((n for n in adapters if key.startswith(n + ".")), None)
        if owner is None:
            state[key] = value.detach().cpu().clone()
            continue
        rest = key[len(owner) + 1 :]
        if rest.startswith("alpha."):
            continue
        plain_key = f"{owner}.{rest.removeprefix('conv.')}"
        if rest == "conv.weight":
            value = fold_centre_tap(value, adapters[owner].alpha.weight)
        state[plain_key] = value.detach().cpu().clone()
    return state


@dataclass(frozen=True)
class TaskWeights:
    """What one task changes in a plain backbone's state dict (small: ship one per task).

    Attributes:
        centre_deltas: conv weight name -> (C_out, C_in/groups) added to that kernel's centre tap (TSA alpha).
        replaced: state-dict name -> new value (BN-affine weight and bias).
        beta: (D, D) pre-classifier alignment, `mapped = feats @ beta.T`; None when the method has none.
    """

    centre_deltas: dict[str, F32] = field(default_factory=dict)
    replaced: dict[str, F32] = field(default_factory=dict)
    beta: F32 | None = None

    @property
    def nbytes(self) -> int:
        arrays = [*self.centre_deltas.values(), *self.replaced.values(), *([self.beta] if self.beta is not None else [])]
        return int(sum(a.nbytes for a in arrays))

    def apply(self, plain_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The folded state dict: `plain_state` with the deltas added and the replacements written.

        Raises:
            BundleError: a key is missing or a shape differs (the task was fitted on another backbone).
        """
        state = dict(plain_state)
        for key, value in self.changed_weights(plain_state).items():
            state[key] = torch.from_numpy(value).to(plain_state[key].dtype)
        return state

    def changed_weights(self, plain_state: Mapping[str, torch.Tensor]) -> dict[str, F32]:
        """Full new values of only the tensors this task changes, keyed by state-dict name (e.g. for a refit)."""
        changed: dict[str, F32] = {}
        for key, delta in self.centre_deltas.items():
            base = _plain(plain_state, key)
            if base.ndim != 4 or base.shape[:2] != delta.shape:
                raise BundleError(
                    f"task weights do not fit this backbone: {key} is {tuple(base.shape)}, the task's alpha "
                    f"{tuple(delta.shape)}; re-run adapt with this backbone"
                )
            changed[key] = fold_centre_tap(base, torch.from_numpy(delta)).numpy().astype(np.float32)
        for key, value in self.replaced.items():
            base = _plain(plain_state, key)
            if tuple(base.shape) != value.shape:
                raise BundleError(
                    f"task weights do not fit this backbone: {key} is {tuple(base.shape)}, the task's "
                    f"{value.shape}; re-run adapt with this backbone"
                )
            changed[key] = value.astype(np.float32, copy=True)
        return changed

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays ("delta/NAME", "set/NAME", "beta"): the per-task weight format a task artefact stores."""
        arrays: dict[str, np.ndarray] = {f"delta/{k}": v for k, v in self.centre_deltas.items()}
        arrays.update({f"set/{k}": v for k, v in self.replaced.items()})
        if self.beta is not None:
            arrays["beta"] = self.beta
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TaskWeights:
        """Read `to_arrays`' keys (other keys, e.g. the task's graph, are ignored)."""
        return cls(
            centre_deltas={k[6:]: np.asarray(v) for k, v in arrays.items() if k.startswith("delta/")},
            replaced={k[4:]: np.asarray(v) for k, v in arrays.items() if k.startswith("set/")},
            beta=None if arrays.get("beta") is None else np.asarray(arrays["beta"]),
        )

    def save(self, path: str | Path) -> Path:
        """Atomically write an uncompressed `.npz` of `to_arrays()` (plus a format version)."""
        return save_npz(path, {_FORMAT_KEY: np.array(_FORMAT_VERSION), **self.to_arrays()})

    @classmethod
    def load(cls, path: str | Path) -> TaskWeights:
        """Read a file written by `save`.

        Raises:
            BundleError: the file is missing or not a task-weights file of this version.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot read task weights {path}: {exc}; re-run adapt to write them") from None
        if arrays.pop(_FORMAT_KEY, None) != _FORMAT_VERSION:
            raise BundleError(f"{path} is not a version-{_FORMAT_VERSION} fsdeploy task-weights file; re-run adapt")
        return cls.from_arrays(arrays)


def task_weights(
    model: nn.Module, *, replaced_keys: Iterable[str] = (), beta: F32 | None = None
) -> TaskWeights:
    """Collect a fitted model's per-task changes: every adapter's alpha, the named state entries, and beta.

    Args:
        model: the fitted network (with adapters for TSA, plain for BN-affine).
        replaced_keys: plain state-dict names whose whole value changes (BN-affine weight/bias).
        beta: the fitted (D, D) alignment map, if any.
    """
    deltas = {}
    for name, adapter in adapters_of(model).items():
        check_foldable(adapter, name)
        w = adapter.alpha.weight.detach().cpu().float().numpy()
        deltas[f"{name}.weight"] = w.reshape(w.shape[0], w.shape[1]).copy()
    state = folded_state(model) if replaced_keys else {}
    replaced = {k: state[k].float().numpy().copy() for k in replaced_keys}
    return TaskWeights(deltas, replaced, None if beta is None else np.asarray(beta, dtype=np.float32).copy())


def _plain(plain_state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in plain_state:
        raise BundleError(f"task weights name {key}, which this backbone's state dict lacks; re-run adapt with this backbone")
    return plain_state[key].detach().cpu().float()
