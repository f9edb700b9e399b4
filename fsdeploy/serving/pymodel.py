"""The `model.py` every Python-backend model of the repository gets, and the glue it calls.

Why the file is this small: Triton's Python backend stub embeds the interpreter whose libpython it finds
and ignores virtual environments and PYTHONPATH, so `model.py` first puts the paths recorded in its
config (`fsdeploy_sys_path`, a JSON list: the fsdeploy source tree, or nothing when fsdeploy is installed
in the serving Python) on `sys.path`, then hands every call to the role named by `fsdeploy_role`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MODEL_PY = '''"""Written by `fsdeploy triton export`: a Triton Python-backend model that delegates to fsdeploy.serving."""
import json
import sys
from pathlib import Path


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        for entry in reversed(json.loads(params.get("fsdeploy_sys_path", "[]"))):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        from fsdeploy.serving.pymodel import TritonModel

        repo = Path(args["model_repository"]).parents[1]  # args give this model's folder: REPO/models/<model>
        self.impl = TritonModel(params["fsdeploy_role"], repo, params, config)

    def execute(self, requests):
        return self.impl.execute(requests)

    def finalize(self):
        self.impl.finalize()
'''


class TritonModel:
    """Turns Triton requests into numpy dicts for a role and its results back into responses."""

    def __init__(self, role: str, repo: Any, params: dict[str, str], config: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils  # only inside the Triton stub

        from fsdeploy.serving.roles import make_role

        self.pb = pb_utils
        self.role = make_role(role, repo, params)
        self.names = [i["name"] for i in config.get("input", [])]

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        pb = self.pb
        feeds = []
        for request in requests:
            d = {}
            for name in self.names:
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is not None:  # optional inputs may be absent
                    d[name] = tensor.as_numpy()
            feeds.append(d)
        try:
            results = self.role.run(feeds)
        except Exception as exc:  # a bug in a role answers every request; it never kills the stub
            results = [exc] * len(requests)
        responses = []
        for res in results:
            if isinstance(res, Exception):
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(_message(res))))
            else:
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in res.items()]))
        return responses

    def finalize(self) -> None:
        self.role.close()


def _message(exc: Exception) -> str:
    from fsdeploy.errors import FsdeployError

    if isinstance(exc, FsdeployError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
