"""The Hugging Face hub: offline mode at once where its host does not resolve."""
import os
import sys

import pytest

from mlxgpt.hub import PROXY_VARIABLES, offline_unless_reachable


@pytest.fixture
def hub_settings(monkeypatch):
    """A clean slate: no offline mode, no proxy; the hub libraries' constants restored afterwards."""
    import datasets.config
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    return monkeypatch


def test_a_hub_host_that_does_not_resolve_turns_on_offline_mode(hub_settings):
    hub_settings.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    offline_unless_reachable()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE is True
    assert sys.modules["datasets.config"].HF_HUB_OFFLINE is True


@pytest.mark.parametrize("setting", ["HF_ENDPOINT=http://localhost:1", "HTTPS_PROXY=http://127.0.0.1:9"])
def test_a_resolving_host_or_a_proxy_leaves_online_mode(hub_settings, setting):
    name, _, value = setting.partition("=")
    hub_settings.setenv("HF_ENDPOINT", "https://hub.invalid")
    hub_settings.setenv(name, value)
    offline_unless_reachable()
    assert "HF_HUB_OFFLINE" not in os.environ
    assert sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE is False
