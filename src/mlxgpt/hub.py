"""The Hugging Face hub: where its host name does not resolve (no network), the hub libraries read their local cache
only, at once, instead of retrying for ~25 s before failing."""
from __future__ import annotations

import os
import socket
import sys
import threading
from urllib.parse import urlparse

from mlxgpt.log import log

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")  # a proxy resolves names for us
RESOLVE_SECONDS = 5.0


def offline_unless_reachable() -> None:
    """Switch huggingface_hub and datasets to offline mode (HF_HUB_OFFLINE=1) when the hub's host does not resolve."""
    if os.environ.get("HF_HUB_OFFLINE") or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    if not host or _resolves(host):
        return
    os.environ["HF_HUB_OFFLINE"] = "1"  # read when the libraries are first imported...
    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:  # ...and where they already are, their constant
            setattr(sys.modules[module], name, True)
    log.info(f"mlxgpt: {host} does not resolve (no network?): Hugging Face files come from the local cache only")


def _resolves(host: str) -> bool:
    """Whether DNS answers for host within RESOLVE_SECONDS (a resolver that does not answer counts as no network)."""
    answer: list[bool] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(RESOLVE_SECONDS)
    return bool(answer and answer[0])
