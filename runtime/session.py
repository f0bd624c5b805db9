"""onnxruntime sessions and the KV cache for one artifact graph.

A decode step feeds `input_ids`, `attention_mask`, `position_ids` and the cache's pasts, and returns the logits
while the cache takes the presents. The cache is a small class so that an in-place, preallocated cache can
replace it without touching the generation loop.

CPU: `session.run` with numpy; the presents of one step are fed back unchanged as the next step's pasts (no
Python-side concatenation; the graph's Concat does the growth). CUDA: IO binding; inputs are copied to the device
once per step (a few int64s), presents stay on the device as OrtValues and are bound as the next pasts, and only
the logits come back to the host.
"""

import math
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import ArtifactError, ProviderError
from .kv import SharedKVCache, shared_step

MODEL_FILE, TOKENIZER_FILE = "model.onnx", "tokenizer.json"

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
KV_DTYPES = {"float32": np.float32, "float16": np.float16}
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
LOGITS_TO_KEEP = "logits_to_keep"


# Where the kernel says which cgroup this process is in, and where cgroup files are mounted (tests point them
# at temporary files).
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota when one is set.

    `os.cpu_count()` counts the machine's cores, so a container limited to 2 CPUs, or a process pinned to 4 of 64
    cores (taskset, numactl, an edge box's isolated cores), would otherwise start 64 spinning threads. A quota of
    1.5 CPUs counts as 2 (rounded up, at least 1).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cores, quota) if quota is not None else cores)


def cgroup_cpu_limit():
    """ceil(quota / period) of the tightest CPU quota on this process's cgroup path (v2 cpu.max, or v1
    cpu.cfs_quota_us over cpu.cfs_period_us), its ancestors included; None when there is none or it is unreadable."""
    limits = []
    try:
        lines = PROC_SELF_CGROUP.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, path = parts[1].split(","), parts[2].strip().lstrip("/")
        if parts[1] == "":  # v2: one unified hierarchy
            files = [(CGROUP_ROOT, "cpu.max", None)]
        elif "cpu" in controllers:  # v1: the cpu controller's own mount
            files = [(CGROUP_ROOT / name, "cpu.cfs_quota_us", "cpu.cfs_period_us")
                     for name in (parts[1], "cpu", "cpu,cpuacct") if (CGROUP_ROOT / name).is_dir()][:1]
        else:
            continue
        for root, quota_name, period_name in files:
            for directory in _ancestors(root, path):
                limit = _quota(directory, quota_name, period_name)
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def _ancestors(root: Path, path: str) -> list:
    """root/a/b/c, root/a/b, root/a, root (a container often sees only root: its own cgroup, namespaced)."""
    parts = [p for p in path.split("/") if p]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _quota(directory: Path, quota_name: str, period_name):
    try:
        if period_name is None:  # v2 cpu.max: "max 100000" or "150000 100000"
            fields = (directory / quota_name).read_text().split()
            if not fields or fields[0] == "max":
                return None
            quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100000
        else:  # v1: quota -1 means none
            quota = int((directory / quota_name).read_text().strip())
            period = int((directory / period_name).read_text().strip())
    except (OSError, ValueError, IndexError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def check_threads(threads) -> None:
    """Refuse a thread count that is not None or an integer >= 1.

    Raises:
        ProviderError: one line naming the bad value.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 1):
        raise ProviderError(f"threads must be None (the cores this process may use) or an integer >= 1, "
                            f"got {threads!r}")


SPINNING = "session.intra_op.allow_spinning"


def session_options(threads=None, spin_threads: bool = True) -> ort.SessionOptions:
    """Full graph optimisation, sequential execution, one intra-op thread per available core (or `threads`).

    spin_threads False: the intra-op threads sleep between runs instead of spinning (onnxruntime's default): a
    server's HTTP loop and its scheduler's Python run between the runs on the same cores (bench/serve_bench.py).
    """
    check_threads(threads)
    options = ort.SessionOptions()
    if not spin_threads:
        options.add_session_config_entry(SPINNING, "0")
    options.intra_op_num_threads = int(threads) if threads is not None else available_cores()
    # errors only: at load onnxruntime warns about every input with a default (logits_to_keep, by design
    # overridable) on every process start; what a user must know is raised or warned by the runtime itself
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def resolve_providers(provider: str) -> list:
    """onnxruntime provider list for "cpu" or "cuda".

    Raises:
        ProviderError: unknown name, or CUDA requested but this onnxruntime has no CUDA provider.
    """
    if not isinstance(provider, str) or provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ProviderError("provider 'cuda' requested but this onnxruntime has no CUDAExecutionProvider "
                            "(install onnxruntime-gpu, or use --provider cpu)")
    return PROVIDERS[provider]


# Artifacts whose graph has a node onnxruntime's CUDA provider has no kernel for (checked against onnxruntime's
# contrib_ops/cuda kernel registrations): under provider "cuda" that node would run on the CPU and its tensors
# (activations, and for attention the whole KV cache) would cross the bus every step. Every other op of our
# graphs (MultiHeadAttention, RotaryEmbedding, SkipLayerNormalization, FastGelu, MatMulNBits, standard ops) has
# float32 and float16 CUDA kernels.
CUDA_UNSUPPORTED = [
    (lambda m: m.get("dtype") == "int8",
     "its int8 weights use com.microsoft DynamicQuantizeMatMul, which onnxruntime implements on the CPU only "
     "(export with --fp16 or --int4 for CUDA)"),
    (lambda m: m.get("kv_layout") == "shared_buffer" and m.get("kv_dtype") != "float16",
     "its shared_buffer KV cache uses com.microsoft GroupQueryAttention, whose CUDA kernels take float16 or "
     "bfloat16 only (export with --fp16, or with --kv-layout concat)"),
]
DISABLE_CPU_FALLBACK = "session.disable_cpu_ep_fallback"
CPU_FALLBACK_REFUSAL = "assigned to the default CPU EP"  # onnxruntime's error when that option refuses a graph


class CPUFallbackWarning(RuntimeWarning):
    """provider "cuda": onnxruntime placed some nodes of the graph on the CPU."""


def check_cuda_placement(manifest: dict, directory) -> None:
    """Refuse, before any session, an artifact that has a node with no CUDA kernel.

    Raises:
        ProviderError: one line naming the node type and the exports that run on CUDA.
    """
    for applies, why in CUDA_UNSUPPORTED:
        if applies(manifest):
            raise ProviderError(f"provider 'cuda' refused for {directory} (dtype {manifest.get('dtype')}, kv layout "
                                f"{manifest.get('kv_layout', 'concat')}): {why}; or use --provider cpu")


def _cuda_session(source, model_path, threads) -> ort.InferenceSession:
    """A CUDA session that is refused at load when any node falls back to the CPU, retried with a loud warning.

    onnxruntime's own check (`session.disable_cpu_ep_fallback`) refuses a graph with any node on the CPU, and
    onnxruntime places small shape computations there by design, so a refusal here cannot tell those from a
    compute node: the known compute nodes are refused before (`check_cuda_placement`); for the rest the session
    is made again with fallback allowed and a CPUFallbackWarning says so. Python's own silent retry on the CPU
    (InferenceSession's enable_fallback) is off in both.
    """
    import warnings

    strict = session_options(threads)
    strict.add_session_config_entry(DISABLE_CPU_FALLBACK, "1")
    try:
        return ort.InferenceSession(source, sess_options=strict, providers=PROVIDERS["cuda"][:1], enable_fallback=0)
    except Exception as e:  # noqa: BLE001 - onnxruntime's Fail; anything else is retried and reported below
        if CPU_FALLBACK_REFUSAL not in str(e):
            raise
    warnings.warn(f"provider 'cuda': onnxruntime placed some nodes of {model_path} on the CPU (it refuses the graph "
                  f"with {DISABLE_CPU_FALLBACK}=1); shape computations are placed there by design, a compute node "
                  f"there copies its tensors across the bus every step (onnxruntime's verbose log lists the "
                  f"placement)", CPUFallbackWarning, stacklevel=4)
    return ort.InferenceSession(source, sess_options=session_options(threads), providers=PROVIDERS["cuda"],
                                enable_fallback=0)


def create_session(model_path, provider: str = "cpu", threads=None, model_bytes: bytes | None = None,
                   spin_threads: bool = True) -> ort.InferenceSession:
    """Load an ONNX graph into an InferenceSession.

    Args:
        model_path: path to model.onnx (external data is resolved next to it; named in errors).
        provider: "cpu" or "cuda".
        threads: intra-op threads (None: `available_cores()`).
        model_bytes: the graph's bytes, already read and verified (a graph without external data): onnxruntime
            loads these instead of opening `model_path`, so the file cannot change between hashing and loading.
        spin_threads: see `session_options`.
    Returns:
        The session.
    Raises:
        ProviderError: see `resolve_providers`, or a bad `threads`.
        ArtifactError: onnxruntime could not load the graph (one line).
    Warns:
        CPUFallbackWarning: provider "cuda" and onnxruntime placed some nodes on the CPU (see `_cuda_session`).
    """
    providers = resolve_providers(provider)
    options = session_options(threads, spin_threads)
    try:
        source = model_bytes if model_bytes is not None else str(model_path)
        if provider == "cuda":
            session = _cuda_session(source, model_path, threads)
        else:
            session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"onnxruntime could not load {model_path}: {first}") from None
    if providers[0] not in session.get_providers():  # onnxruntime-gpu without a usable GPU falls back silently
        raise ProviderError(f"provider {provider!r} requested but onnxruntime could not use {providers[0]} "
                            "here (no device or driver?); use --provider cpu")
    return session


def open_artifact_files(directory: Path, manifest: dict, verify: str, provider: str, threads=None, create=None):
    """The verified tokenizer and graph of an artifact whose manifest is loaded: (Tokenizer, InferenceSession).

    Shared by runtime.load (text generation) and runtime/heads.py (the other tasks); `create` is the session
    factory (default `create_session`: the callers pass the one their module holds).

    Raises:
        ArtifactError: model.onnx or tokenizer.json is not in the manifest, a file fails its checksum, the
            tokenizer does not parse, or the graph's external data is missing or wrong.
    """
    from tokenizers import Tokenizer

    from .manifest import read_verified
    from .onnx_refs import check_external_data

    for name in (MODEL_FILE, TOKENIZER_FILE):
        if name not in manifest["files"]:
            raise ArtifactError(f"{directory} has no {name} in its manifest; re-run gptexport")
    raw = read_verified(directory, TOKENIZER_FILE, manifest, verify)
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"could not load {directory / TOKENIZER_FILE}: {first[:200]}") from None
    graph = read_verified(directory, MODEL_FILE, manifest, verify)
    external = check_external_data(directory, MODEL_FILE, manifest["files"], data=graph)  # before onnxruntime
    session = (create or create_session)(directory / MODEL_FILE, provider, threads,
                                         model_bytes=None if external else graph)
    return tokenizer, session


def kv_names(input_names: list) -> list:
    """(past input, present output) name pairs in graph order, e.g. past_key_values.0.key -> present.0.key."""
    return [(name, PRESENT_PREFIX + name[len(PAST_PREFIX):]) for name in input_names
            if name.startswith(PAST_PREFIX)]


class KVCache:
    """Host-side cache: the last step's presents, fed back as the next step's pasts.

    Args:
        pairs: (past name, present name) per tensor.
        batch, num_heads, head_size: the cache geometry.
        dtype: numpy kv dtype.
    """

    def __init__(self, pairs: list, batch: int, num_heads: int, head_size: int, dtype):
        self.pairs = pairs
        empty = np.zeros((batch, num_heads, 0, head_size), dtype=dtype)  # (B, nh, 0, hs)
        self.values = {past: empty for past, _ in pairs}

    @property
    def length(self) -> int:
        """Cached positions per row (padding included)."""
        return next(iter(self.values.values())).shape[2] if self.values else 0

    def feeds(self) -> dict:
        """The past inputs for the next step."""
        return self.values

    def present_names(self) -> list:
        """The outputs to fetch after each step."""
        return [present for _, present in self.pairs]

    def update(self, presents: list) -> None:
        """Take this step's presents (in `present_names` order) as the next pasts."""
        self.values = {past: value for (past, _), value in zip(self.pairs, presents)}

    def reorder(self, indices) -> None:
        """Beam search: row i of every past becomes old row indices[i] (the batch may grow, e.g. beam expansion)."""
        indices = np.asarray(indices, dtype=np.int64)
        self.values = {past: np.take(value, indices, axis=0) for past, value in self.values.items()}

    def truncate(self, length: int) -> None:
        """Speculative decoding: keep the first `length` positions of every row (rejected drafts are dropped)."""
        self.values = {past: np.ascontiguousarray(value[:, :, :length]) for past, value in self.values.items()}


class DeviceKVCache(KVCache):
    """CUDA cache: presents stay on the device as OrtValues and are bound as the next pasts."""

    def __init__(self, pairs, batch, num_heads, head_size, dtype, device_id: int = 0):
        super().__init__(pairs, batch, num_heads, head_size, dtype)
        self.device_id = device_id
        self.values = {past: ort.OrtValue.ortvalue_from_numpy(value, "cuda", device_id)
                       for past, value in self.values.items()}

    @property
    def length(self) -> int:
        return next(iter(self.values.values())).shape()[2] if self.values else 0

    def reorder(self, indices) -> None:
        """As `KVCache.reorder`, through the host (beam search on CUDA pays one round trip per step)."""
        indices = np.asarray(indices, dtype=np.int64)
        self.values = {past: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(np.take(value.numpy(), indices,
                                                                                           axis=0)),
                                                              "cuda", self.device_id)
                       for past, value in self.values.items()}

    def truncate(self, length: int) -> None:
        """As `KVCache.truncate`, through the host."""
        self.values = {past: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[:, :, :length]),
                                                              "cuda", self.device_id)
                       for past, value in self.values.items()}


class Decoder:
    """One artifact graph plus the step function used by the generation loop.

    Args:
        session: the InferenceSession.
        provider: "cpu" or "cuda" (CUDA uses IO binding).
        manifest: the artifact manifest (config and kv_dtype).
    """

    def __init__(self, session: ort.InferenceSession, provider: str, manifest: dict):
        self.session = session
        self.provider = provider
        config = manifest["config"]
        self.num_heads, self.head_size = config["num_heads"], config["head_size"]
        if manifest["kv_dtype"] not in KV_DTYPES:
            raise ArtifactError(f"kv_dtype {manifest['kv_dtype']!r} is not supported; "
                                f"expected one of {', '.join(KV_DTYPES)}")
        self.kv_dtype = KV_DTYPES[manifest["kv_dtype"]]
        self.input_names = [i.name for i in session.get_inputs()]
        # an input with a default (an overridable initializer): graphs/last_logits.py
        self.keeps_logits = LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}
        self.pairs = kv_names(self.input_names)
        # graphs/shared_kv.py variant: max-length buffers written in place (runtime/kv.py)
        self.shared = manifest.get("kv_layout") == "shared_buffer"
        special = manifest.get("special_tokens", {})
        self.pad_token_id = next((t for t in (special.get("pad_token_id"), special.get("eos_token_id"))
                                  if t is not None), 0)
        self._check_graph(manifest)
        self.logits_meta = self._logits_meta(manifest)  # (vocab, dtype): shared_buffer decode steps bind by pointer

    def _logits_meta(self, manifest: dict):
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        vocab = logits.shape[-1] if logits.shape and isinstance(logits.shape[-1], int) else None
        vocab = vocab or manifest["config"].get("vocab_size")
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(logits.type)
        return (int(vocab), dtype) if vocab and dtype is not None else None

    def _check_graph(self, manifest: dict) -> None:
        outputs = {o.name for o in self.session.get_outputs()}
        needed = (["input_ids", "position_ids", "seqlens_k", "total_sequence_length", "logits_index"]
                  if self.shared else ["input_ids", "attention_mask", "position_ids"])
        missing = [n for n in needed if n not in self.input_names]
        missing += [p for _, p in self.pairs if p not in outputs] + ([] if "logits" in outputs else ["logits"])
        if missing or len(self.pairs) != 2 * manifest["config"]["num_layers"]:
            raise ArtifactError(f"model.onnx does not follow the artifact contract (missing: "
                                f"{', '.join(missing) or 'none'}; {len(self.pairs)} past tensors for "
                                f"{manifest['config']['num_layers']} layers)")

    def new_cache(self, batch: int, capacity: int = 0) -> KVCache:
        """An empty cache for `batch` rows on this decoder's device (`capacity` slots per row: shared_buffer)."""
        if self.shared:
            return SharedKVCache(self.pairs, batch, self.num_heads, self.head_size, capacity, self.kv_dtype,
                                 self.provider)
        cls = DeviceKVCache if self.provider == "cuda" else KVCache
        return cls(self.pairs, batch, self.num_heads, self.head_size, self.kv_dtype)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: KVCache, logits_to_keep: int = 0) -> np.ndarray:
        """Run one prefill or decode step and advance the cache.

        Args:
            input_ids: (B, S) int64.
            attention_mask: (B, past + S) int64.
            position_ids: (B, S) int64.
            cache: the request's cache; updated with the presents.
            logits_to_keep: k > 0 returns the logits of the last k positions only, where the graph has the
                `logits_to_keep` input (graphs/last_logits.py), else all S; 0: all S.
        Returns:
            (B, S or k, vocab) logits on the host (the shared_buffer graph: (B, 1, vocab) always; on CPU its
            decode steps return the request's bound logits array, overwritten by the cache's next step).
        """
        if isinstance(cache, SharedKVCache):  # (B, 1, vocab): each row's last position only
            return shared_step(self.session, cache, input_ids, attention_mask, position_ids, self.pad_token_id,
                               self.logits_meta)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if logits_to_keep and self.keeps_logits:
            feeds[LOGITS_TO_KEEP] = np.array(logits_to_keep, dtype=np.int64)
        if self.provider == "cuda":
            return self._step_bound(feeds, cache)
        outputs = self.session.run(["logits"] + cache.present_names(), {**feeds, **cache.feeds()})
        cache.update(outputs[1:])
        return outputs[0]

    def _step_bound(self, feeds: dict, cache: DeviceKVCache) -> np.ndarray:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", cache.device_id))
        for name, value in cache.feeds().items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")  # host memory: the only bytes that cross the bus each step
        for name in cache.present_names():
            binding.bind_output(name, "cuda", cache.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        cache.update(outputs[1:])
        return outputs[0].numpy()
