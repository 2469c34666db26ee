"""Where a `pretrained:` checkpoint comes from, and its config.json, without loading a weight:
  * `cell:<model label>/<router label>`: a finished cell of the same study (same dataset and seed), which the driver
    exports to the Hugging Face format and runs first;
  * a local folder holding a `save_pretrained` checkpoint;
  * a hub name, read from the local Hugging Face cache, or downloaded when the hub is reachable.
A hub name with no network fails at once, with what to do, instead of timing out inside a worker."""
from __future__ import annotations

import json
import os
import re
import socket
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

CELL_PREFIX = "cell:"
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")  # huggingface_hub's repo ids
HUB_HOST = ("huggingface.co", 443)


@dataclass(frozen=True)
class CellSource:
    """A cell of the same study: the (model, router) pair whose finished checkpoint this model starts from."""
    model_label: str
    router_label: str


def cell_source(pretrained: str) -> CellSource | None:
    if not pretrained.startswith(CELL_PREFIX):
        return None
    model, sep, router = pretrained[len(CELL_PREFIX):].partition("/")
    if not sep or not model or not router:
        raise ValueError(f"{_shown(pretrained)}: a cell source is cell:<model label>/<router label>, e.g. cell:llama/dense")
    return CellSource(model, router)


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:80] + "...")


# Set while a study is validated without the hub (`moelab validate --no-hub`): the checks only the hub could answer.
_SKIPPED_HUB_CHECKS: ContextVar[list[str] | None] = ContextVar("skipped_hub_checks", default=None)


class HubCheckSkipped(Exception):
    """A check that needs the hub, left out on purpose (`without_hub`); its message says which."""


@contextmanager
def without_hub() -> Iterator[list[str]]:
    """Validate without the hub: a hub name not in the local cache skips the checks that need its config.json, and
    the returned list names each one skipped."""
    skipped: list[str] = []
    token = _SKIPPED_HUB_CHECKS.set(skipped)
    try:
        yield skipped
    finally:
        _SKIPPED_HUB_CHECKS.reset(token)


def skip_hub_check(what: str) -> None:
    skipped = _SKIPPED_HUB_CHECKS.get()
    if skipped is not None and what not in skipped:
        skipped.append(what)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout_s):
            return True
    except OSError:
        return False


def read_config(pretrained: str) -> dict[str, Any]:
    """config.json of a local folder or hub name (cache first); a clear ValueError when there is none."""
    try:
        folder = Path(pretrained).expanduser()
        is_folder = folder.is_dir()
    except (OSError, RuntimeError, ValueError) as err:  # a name the OS refuses, an unknown ~user, a NUL byte
        raise ValueError(f"{_shown(pretrained)} is not a usable path: {getattr(err, 'strerror', None) or err}") \
            from None
    if is_folder:
        config = folder / "config.json"
        if not config.is_file():
            raise ValueError(f"{_shown(pretrained)} is a folder without config.json: not a save_pretrained checkpoint")
        return json.loads(config.read_text())
    if pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
        raise ValueError(f"{_shown(pretrained)}: no such folder")
    if not HUB_NAME.fullmatch(pretrained):
        raise ValueError(f"{_shown(pretrained)} is neither a folder nor a hub name (<org>/<name>)")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(pretrained, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if _SKIPPED_HUB_CHECKS.get() is not None:
        raise HubCheckSkipped(f"{pretrained}: its config.json (architecture, the routers and LoRA targets on it)")
    if not hub_reachable():
        raise ValueError(f"{_shown(pretrained)} is not a local folder, not in the Hugging Face cache, and the hub "
                         f"({HUB_HOST[0]}) is unreachable from here: download it where there is a network "
                         "(huggingface-cli download <name>) or give a local path")
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(pretrained, "config.json")).read_text())
