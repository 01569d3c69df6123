"""From ``Config.router`` (+ ``Config.model``, ``Config.chunk``) to what the router runs on.

``BackendSpec``: one engine instance and, optionally, its kvtier daemon's HTTP address (for
``POST /lookup``) and token. ``LookupNamespace``: the fields ``/lookup`` needs to compute the
same chunk keys as the instances' connector — the model id, KV dtype and shape (read from the
served model's ``config.json`` where the config leaves them empty) and the chunk size.

Invariant: a spec that cannot be used (no scheme, an unknown option, a token file that cannot be
read) is a ``RouterConfigError`` naming the spec and the fix, raised at start, never per request.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.config import Config
from kvtier.errors import KVTierError

DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
}


class RouterConfigError(KVTierError, ValueError):
    """A router setting that cannot work (bad backend spec, missing model directory)."""


@dataclass(frozen=True)
class BackendSpec:
    url: str  # the engine's base URL, without /v1
    lookup_url: str = ""  # its kvtier daemon's HTTP address ("" = no prefix signal)
    token: str = ""

    @property
    def name(self) -> str:
        return self.url


@dataclass(frozen=True)
class LookupNamespace:
    """The /lookup body's namespace fields (see kvtier.server.http)."""

    model_id: str
    kv_dtype: str
    kv_shape: tuple[int, int, int]
    chunk_tokens: int
    tp_size: int = 1
    cache_salt: str = ""

    def body(self, tokens: list[int]) -> dict[str, Any]:
        return {
            "tokens": tokens,
            "model_id": self.model_id,
            "kv_dtype": self.kv_dtype,
            "kv_shape": list(self.kv_shape),
            "tp_size": self.tp_size,
            "cache_salt": self.cache_salt,
            "chunk_tokens": self.chunk_tokens,
        }


def _check_url(url: str, what: str) -> str:
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise RouterConfigError(f"{what} {url!r} is not an http(s)://HOST:PORT address")
    return url.rstrip("/").removesuffix("/v1")


def _read_token(path: str, where: str) -> str:
    try:
        return Path(path).expanduser().read_text().strip()
    except OSError as e:
        raise RouterConfigError(
            f"{where}: cannot read token file {path}: {e.strerror} — pass the file the daemon's "
            "--auth-token-file names (or /dev/shm/kvtier-PORT.token for a local daemon)"
        ) from e


def parse_backends(text: str | list[str], default_token_file: str = "") -> list[BackendSpec]:
    """Engine URLs separated by spaces, ``,`` or ``;`` (or a YAML list); a ``lookup=DAEMON_URL``
    or ``token=FILE`` item belongs to the URL before it: ``URL,lookup=URL,token=FILE URL2 ...``."""
    raw = text if isinstance(text, list) else [text]
    items = [s for part in raw for s in re.split(r"[\s;,]+", str(part)) if s]
    groups: list[list[str]] = []
    for item in items:
        if "://" in item.partition("=")[0] or not groups:
            groups.append([item])
        else:
            groups[-1].append(item)
    out: list[BackendSpec] = []
    for url, *opts in groups:
        lookup, token_file = "", default_token_file
        for opt in opts:
            key, sep, value = opt.partition("=")
            if key == "lookup" and sep:
                lookup = _check_url(value, f"backend {url!r}: lookup")
            elif key in ("token", "token-file", "token_file") and sep:
                token_file = value
            else:
                raise RouterConfigError(
                    f"backend {url!r}: unknown option {opt!r} — write URL[,lookup=DAEMON_URL][,token=FILE]"
                )
        token = _read_token(token_file, f"backend {url!r}") if token_file and lookup else ""
        out.append(BackendSpec(_check_url(url, "backend"), lookup, token))
    names = [b.url for b in out]
    if len(set(names)) != len(names):
        raise RouterConfigError(f"a backend is listed twice: {names} — list each instance once")
    return out


def lookup_namespace(cfg: Config, model_dir: str | None = None) -> LookupNamespace | None:
    """The /lookup namespace, or None when no model directory (``model_dir``, else
    ``router.tokenizer``) or ``model`` setting says what the engines serve."""
    m = cfg.model
    model_dir = model_dir or cfg.router.tokenizer
    model_json: dict[str, Any] = {}
    if model_dir:
        path = Path(model_dir).expanduser() / "config.json"
        try:
            model_json = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RouterConfigError(
                f"router.tokenizer: cannot read {path}: {e} — pass the model directory the engines serve"
            ) from e
    text = model_json.get("text_config") or model_json
    heads = int(text.get("num_attention_heads") or 0)
    shape = (
        m.num_layers or int(text.get("num_hidden_layers") or 0),
        m.num_kv_heads or int(text.get("num_key_value_heads") or heads),
        m.head_dim
        or int(text.get("head_dim") or (int(text.get("hidden_size") or 0) // heads if heads else 0)),
    )
    dtype = m.kv_dtype or DTYPES.get(str(text.get("dtype") or text.get("torch_dtype") or ""), "")
    model_id = m.model_id or model_dir
    if not (model_id and dtype and all(shape)):
        return None
    return LookupNamespace(model_id, dtype, shape, cfg.chunk.chunk_tokens, m.tp_size, m.cache_salt)
