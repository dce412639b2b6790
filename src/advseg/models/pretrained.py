"""ImageNet encoder weights: found in the local cache, fetched from a reachable hub, or one line.

segmentation_models_pytorch downloads ``encoder_weights="imagenet"`` from the Hugging Face Hub
through huggingface_hub, whose client retries an unreachable host five times with back-off (about
25 s) and logs every try: offline, that was 12 lines and a wait before advseg's error. Here the
local Hugging Face cache is looked up first (found: loaded with the hub's offline mode on, no
request), then the hub's host is probed once with a short timeout, and the download itself runs
with the client's log quiet; a cache miss with no reachable hub is one :class:`UserError` naming
the encoder and the way out (a local weights file, see
:func:`advseg.models.zoo.load_encoder_weights`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from advseg.errors import UserError

PROBE_TIMEOUT_S = 5.0
"""How long the one connection attempt to the hub may take before advseg calls it unreachable."""

_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def ensure_imagenet(name: str, encoder: str) -> bool:
    """Whether ``encoder``'s ImageNet weights are in the local cache (True: load them with the
    hub offline, :func:`quiet_hub`), or the hub can be reached (False); else one
    :class:`UserError`.

    The cache is ``HF_HOME``'s; the hub (``HF_ENDPOINT``) is reachable when it answers one
    connection within :data:`PROBE_TIMEOUT_S`. Behind a proxy (an ``HTTPS_PROXY`` or
    ``ALL_PROXY`` variable) the probe is left to the download itself.
    """
    if _cached(encoder):
        return True
    from huggingface_hub import constants

    way_out = "pass a local encoder weights file (--encoder-weights PATH) instead"
    if constants.is_offline_mode():
        raise UserError(
            f"model {name!r}: imagenet weights of encoder {encoder!r} are not in the local "
            f"Hugging Face cache and HF_HUB_OFFLINE is set; {way_out}"
        )
    if any(os.environ.get(variable) for variable in _PROXIES):
        return False
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise UserError(
            f"model {name!r}: imagenet weights of encoder {encoder!r} are not in the local "
            f"Hugging Face cache and {host} cannot be reached ({reason}); {way_out}"
        ) from None
    return False


@contextmanager
def quiet_hub(offline: bool = False) -> Iterator[None]:
    """huggingface_hub's retry lines off while a download runs (its errors still raise, and the
    caller turns them into one line; the download's progress bar stays); with ``offline``, the
    hub's offline mode on, so that weights found in the cache load with no request at all (it
    asks the hub about a cached file otherwise)."""
    from huggingface_hub import constants

    logger = logging.getLogger("huggingface_hub")
    level, was_offline = logger.level, constants.HF_HUB_OFFLINE
    logger.setLevel(logging.ERROR)
    constants.HF_HUB_OFFLINE = was_offline or offline
    try:
        yield
    finally:
        logger.setLevel(level)
        constants.HF_HUB_OFFLINE = was_offline


def _cached(encoder: str) -> bool:
    """Whether both files segmentation_models_pytorch fetches for ``encoder`` (``config.json``,
    ``model.safetensors`` at its pinned revision) are in the local cache; False for encoders
    whose weights it does not fetch that way (``tu-`` timm encoders)."""
    from huggingface_hub import try_to_load_from_cache
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet")
    if not settings:
        return False
    return all(
        isinstance(
            try_to_load_from_cache(settings["repo_id"], filename, revision=settings["revision"]),
            str,
        )
        for filename in ("config.json", "model.safetensors")
    )
