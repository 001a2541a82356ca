"""Hub ids: loaded from the local Hugging Face cache when it holds them, downloaded otherwise.

Without a network, huggingface_hub retries each request for most of a minute (printing every retry) before failing
with a message about a missing ``model_index.json``; here an uncached id with the hub out of reach is one line at once.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from .errors import PeftEditError

# Environment variables that route requests through a proxy: the hub's host need not resolve here then.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
# Seconds to wait for the hub's host to accept a connection.
CONNECT_TIMEOUT = 5.0
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has a hub id's shape, "owner/name", rather than a path's ("./x", "/x", "~/x", "x", "a/b/c")."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set, read now (huggingface_hub reads it once, when first imported)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE_VALUES


def reachable() -> bool:
    """Whether the hub's host (``HF_ENDPOINT``'s) accepts a connection; assumed so behind a proxy."""
    from huggingface_hub import constants

    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except OSError:
        return False
    return True


LOCAL_MODEL = "pass a local diffusers folder or .safetensors file"


def load(name: str, loader, what: str | None = None, instead: str = LOCAL_MODEL):
    """``loader(local_files_only=True)`` (which must not touch the network) when the cache holds ``name``; else
    ``loader(local_files_only=False)``, after a one-line error when the hub cannot be reached. ``loader`` raises
    ``OSError`` for files it cannot find. Errors name the files ``what`` (default: "model NAME") and advise
    ``instead``."""
    what = what or f"model {name!r}"
    try:
        return loader(local_files_only=True)
    except OSError:
        pass  # not in the cache (or not all of it): download
    if offline():
        raise PeftEditError(f"{what} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")
    if not reachable():
        raise PeftEditError(
            f"{what} is not in the local Hugging Face cache and the hub cannot be reached (no network?); "
            f"download it where there is one, or {instead}"
        )
    return loader(local_files_only=False)
