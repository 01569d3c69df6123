"""``except KVTierError`` catches every error kvtier raises on purpose (issue 13).

The scan reads every ``raise SomeError(...)`` in ``src/kvtier`` and resolves the name in its
module: each must be a ``KVTierError``. The only exceptions are the run-time *signals* a tier
raises for ``TierManager`` to turn into a miss (``OSError`` for a short write or a short ranged
read) and abstract methods; they are listed by file here, so a new one is a decision, not a slip.
"""

from __future__ import annotations

import ast
import builtins
import importlib
from pathlib import Path

import pytest
import torch

import kvtier
from kvtier import CacheEngine, Config
from kvtier.errors import KVTierError

SRC = Path(kvtier.__file__).parent
SIGNALS = {
    ("tiers/disk_io.py", "OSError"),  # ENOSPC made no progress: the disk tier's put fails softly
    ("tiers/s3.py", "OSError"),  # a short ranged read: the S3 tier's get is a miss
    ("tiers/network.py", "NotImplementedError"),  # abstract methods of NetworkTier
    ("wire/client.py", "ConnectionError"),  # the daemon closed or garbled the stream: reconnect
    ("wire/client.py", "ConnectionResetError"),
    ("server/conn.py", "ConnectionResetError"),  # a client closed mid-frame: drop the connection
    ("__init__.py", "AttributeError"),  # PEP 562 module __getattr__: the protocol requires AttributeError
}
OPTIONAL = ("vllm", "transformers", "redis", "boto3", "matplotlib", "triton")


def _raises(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            f = node.exc.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name:
                out.append((ast.unparse(f), node.lineno))
    return out


def test_every_deliberate_raise_is_a_kvtier_error() -> None:
    bad, checked = [], 0
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        raises = _raises(path)
        if not raises:
            continue
        modname = "kvtier." + rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        try:
            mod = importlib.import_module(modname)
        except ImportError as e:  # an optional engine that is not installed here
            assert any(o in str(e) for o in OPTIONAL), f"{modname}: {e}"
            continue
        for expr, line in raises:
            obj: object = mod
            for part in expr.split("."):
                obj = (
                    getattr(obj, part, None)
                    if obj is not mod
                    else vars(mod).get(part, getattr(builtins, part, None))
                )
            if not isinstance(obj, type):
                continue  # a factory call or an instance
            checked += 1
            if not issubclass(obj, KVTierError) and (rel, obj.__name__) not in SIGNALS:
                bad.append(f"{rel}:{line}: raise {expr}(...)")
    assert checked > 100
    assert not bad, "errors outside the KVTierError root:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "call",
    [
        lambda: Config.load(env={}, cpu__max_bytes="lots"),
        lambda: Config.load(env={}, cpu__eviction_policy="mru"),
        lambda: CacheEngine(Config.load(env={}, cpu__max_bytes="8MiB")).store(
            [1, 2], torch.zeros(1, 2, 3, 1, 4)
        ),
        lambda: CacheEngine(Config.load(env={}, cpu__max_bytes="8MiB")).lookup([[1, 2]]),
        lambda: CacheEngine(Config.load(env={}, cpu__max_bytes="8MiB")).lookup([-1]),
    ],
    ids=["size", "policy", "kv-shape", "tokens-shape", "token-range"],
)
def test_public_api_errors_are_caught_by_the_root(call: object) -> None:
    with pytest.raises(KVTierError):
        call()  # type: ignore[operator]
