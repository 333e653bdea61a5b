"""The environment record that lets a user tell which runs should agree bit for bit."""

from __future__ import annotations

import json
import socket
from importlib.metadata import version

import torch

from rmr_lightning.environment import PACKAGES, run_environment


def test_environment_names_the_versions_cpu_and_threads_of_this_process() -> None:
    env = run_environment()
    assert env["packages"]["torch"] == torch.__version__ == version("torch")
    assert env["packages"]["lightning"] == version("lightning") and set(env["packages"]) == set(PACKAGES)
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch_threads"] == torch.get_num_threads() and env["cpu"]
    assert (env["gpu"] is None) == (not torch.cuda.is_available())
    text = json.dumps(env)  # JSON as it is written, and no host name in it
    assert socket.gethostname() not in text


def test_environment_follows_the_thread_count() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert run_environment()["torch_threads"] == 1
    finally:
        torch.set_num_threads(threads)
