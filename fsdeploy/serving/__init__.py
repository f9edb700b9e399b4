"""Serve a bundle and its tasks on NVIDIA Triton Inference Server.

`write_repository` writes the model repository (shared features model with dynamic batching, a task
store, one head for every task, `classify` ensembles, an `adapt` model); `TritonServer` starts a server
on it; `Client` talks to it through tritonclient. Imports here stay light: no Triton package is needed
to write a repository.
"""
from __future__ import annotations

from fsdeploy.serving.client import Answer, Client, ServerError
from fsdeploy.serving.repository import RepositoryInfo, write_repository
from fsdeploy.serving.server import TritonServer, find_server
from fsdeploy.serving.store import add_task, remove_task

__all__ = ["Answer", "Client", "RepositoryInfo", "ServerError", "TritonServer", "add_task", "find_server",
           "remove_task", "write_repository"]
