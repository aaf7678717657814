"""study.runtime: the dashboard stays on 127.0.0.1 and moves to a free port when its own is taken."""

import logging
import socket
from types import SimpleNamespace

import pytest

from study import runtime
from study.experiment import ResourcesConfig


@pytest.fixture
def taken_port():
    """A port held by a listening socket for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_free_port_keeps_a_free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert runtime.free_port("127.0.0.1", port) == port


def test_free_port_moves_past_a_taken_port_and_says_so(taken_port, caplog):
    with caplog.at_level(logging.WARNING, logger="study.runtime"):
        port = runtime.free_port("127.0.0.1", taken_port)
    assert port != taken_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))  # really free
    assert f"port {taken_port} on 127.0.0.1 is taken" in caplog.text
    assert "resources.dashboard_port" in caplog.text


def test_no_free_port_is_a_clear_error(taken_port):
    with pytest.raises(RuntimeError, match=r"no free port .*resources.dashboard_port"):
        runtime.free_port("127.0.0.1", taken_port, tries=1)


def test_start_ray_passes_the_free_port_and_keeps_the_dashboard_local(taken_port, monkeypatch, capsys):
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(dashboard_url=f"127.0.0.1:{kwargs['dashboard_port']}")

    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.ray, "init", fake_init)
    url = runtime.start_ray(ResourcesConfig(dashboard_port=taken_port))
    (kwargs,) = calls
    assert kwargs["dashboard_host"] == "127.0.0.1"
    assert kwargs["dashboard_port"] != taken_port
    assert url == f"http://127.0.0.1:{kwargs['dashboard_port']}"
    assert f"Ray dashboard: {url}" in capsys.readouterr().out
