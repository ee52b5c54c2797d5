"""The decode loop's `Backend` and the engine's `SlotBackend` (runtime/backend.py) on ONNX Runtime: one session
per graph, created once per bundle.

The engine's step graph (ar_step.onnx) writes the KV cache in place (runtime/slots.py). Today's path, Optimum's
ar_decoder.onnx, takes the cache as `past_key_values.*` and returns it grown by the chunk as `present.*`: the
loop in runtime/decode.py, kept as `decoder="concat"`. A bundle without ar_decoder.onnx runs that loop on the step
graph too (see `ar_step`).

With io_binding (the default on CUDA), the KV cache lives in OrtValues on the device between steps: each
step's `present.*` outputs are bound as the next step's `past_key_values.*` inputs, never copied to the host.
What crosses to the host per step is small: the step's last_hidden_state rows, and the fusion head's logits where a
sampled fill is drawn on the host. Greedy fills, and speculation's greedy drafts, are chosen where the logits are
(runtime/graphs/greedy.onnx, on the same device): only their ids and log-probabilities come back. Without
io_binding every tensor goes through numpy and the choice is made there; both paths are one code path around
`_run`, so tests compare them.
"""

import functools
import itertools
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .choose import best_tokens, refused_matrix
from .device import gpu_index
from .manifest import REEXPORT, Manifest
from .sessions import make_session, provider_name, providers_for
from .slots import SlotCache, capacity_axis, capacity_for

DTYPES = {"fp32": np.float32, "fp16": np.float16}
GREEDY = Path(__file__).resolve().parent / "graphs" / "greedy.onnx"  # export/greedy.py
ELEMENTS = {"fp32": "tensor(float)", "fp16": "tensor(float16)"}


def _declared(session: ort.InferenceSession) -> dict:
    """name -> (element type, shape) of every input and output a session declares."""
    return {value.name: (value.type, value.shape) for value in [*session.get_inputs(), *session.get_outputs()]}


def check_graphs(manifest: Manifest, sessions: dict) -> None:
    """Checks the manifest against what the graphs declare (names, element types, fixed dimensions); raises
    ValueError naming the first difference."""
    m, element = manifest, ELEMENTS[manifest.dtype]
    expected: dict[str, dict[str, tuple[str, dict[int, Any]]]] = {
        "mlm": {"hidden_states": (element, {-1: m.mlm_hidden_size})},
        "ar_decoder": {"last_hidden_state": (element, {-1: m.ar_hidden_size})},
        "fusion_head": {
            "mlm_hidden": (element, {-1: m.mlm_hidden_size}),
            "ar_hidden": (element, {-1: m.ar_hidden_size}),
            "logits": ("tensor(float)", {-1: m.vocab_size}),
        },
    }
    if m.has_baseline_heads:
        expected["ar_lm_head"] = {
            "ar_hidden": (element, {-1: m.ar_hidden_size}),
            "logits": ("tensor(float)", {-1: m.vocab_size}),
        }
        expected["mlm_decoder"] = {
            "mlm_hidden": (element, {-1: m.mlm_hidden_size}),
            "logits": ("tensor(float)", {-1: m.vocab_size}),
        }
    if "ar_decoder" in m.graphs:
        for name in (n for n in m.graph("ar_decoder").inputs if n.startswith("past_key_values.")):
            expected["ar_decoder"][name] = (element, {1: m.num_key_value_heads, 3: m.head_dim})
    if "ar_step" in m.graphs:  # a fixed size where the capacity belongs is another layout (an earlier export)
        expected["ar_step"] = {"last_hidden_state": (element, {-1: m.ar_hidden_size})}
        for name in (n for n in m.graph("ar_step").inputs if n.startswith("cache.")):
            capacity = capacity_axis(name, m.values_transposed)
            head_dim = 5 - capacity  # the other of axes 2 and 3
            expected["ar_step"][name] = (
                element,
                {1: m.num_key_value_heads, head_dim: m.head_dim, capacity: "capacity"},
            )
    for graph, session in sessions.items():
        declared, spec = _declared(session), m.graph(graph)
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if names != (list(spec.inputs), list(spec.outputs)):
            raise ValueError(
                f"{spec.file} takes {names[0]} and gives {names[1]}, but the manifest says "
                f"{spec.inputs} and {spec.outputs}; {REEXPORT}"
            )
        for tensor, (kind, dims) in expected[graph].items():
            found_kind, shape = declared[tensor]
            wrong = {
                axis: shape[axis] for axis, size in dims.items() if isinstance(shape[axis], int) and shape[axis] != size
            }
            if found_kind != kind or wrong:
                raise ValueError(
                    f"{spec.file} '{tensor}' is {found_kind} {shape}, but the manifest describes "
                    f"{kind} with sizes {dims} (axis: size); {REEXPORT}"
                )
    for graph, prefix in (("ar_decoder", "past_key_values."), ("ar_step", "cache.")):
        layers = sum(n.startswith(prefix) for n in m.graph(graph).inputs) // 2 if graph in m.graphs else None
        if layers not in (None, m.num_hidden_layers):
            raise ValueError(
                f"{graph} has the KV cache of {layers} layers, but the manifest says {m.num_hidden_layers}; {REEXPORT}"
            )


def _step_session(
    path: Path, providers: list, cuda_graph: bool, threads: int | None
) -> tuple[ort.InferenceSession, bool]:
    """(the step graph's session, whether it captures CUDA graphs). ONNX Runtime captures only a graph whose nodes
    all run on CUDA, and it places shape arithmetic on the CPU; where it refuses, the step runs without capture,
    with one warning."""
    if not cuda_graph:
        return make_session(path, providers, threads=threads), False
    try:
        return make_session(
            path, [(providers[0][0], {**providers[0][1], "enable_cuda_graph": "1"}), *providers[1:]], threads=threads
        ), True
    except Exception as error:  # ONNX Runtime's Fail, raised while the session is created
        if "graph capture" not in str(error):
            raise
        reason = str(error).strip().splitlines()[-1]
        warnings.warn(
            f"CUDA graphs: ONNX Runtime does not capture this step graph ({reason}); running without capture",
            RuntimeWarning,
            stacklevel=3,
        )
        return make_session(path, providers, threads=threads), False


class OnnxBackend:
    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        device: str = "auto",
        io_binding: bool | None = None,
        cuda_graph: bool = False,
        decoder: str | None = None,
        threads: int | None = None,
    ):
        """cuda_graph: capture the engine's step as CUDA graphs (one per shape) and replay them; CUDA only.
        decoder: "engine" loads only the step graph (scores then run on it too), "concat" only ar_decoder.onnx,
        None both: the two hold the same weights, so one alone halves the AR's memory and load time.
        threads: each session's CPU threads (None: runtime/cpus.py chooses)."""
        providers = providers_for(device)
        self.manifest = manifest
        session = functools.partial(make_session, threads=threads)
        self.mlm = session(Path(folder) / manifest.graph("mlm").file, providers, insist=device not in ("auto", "cpu"))
        if self.mlm.get_providers()[0] != provider_name(providers[0]):
            providers = ["CPUExecutionProvider"]  # after a CUDA fallback, the rest start on CPU directly
        self.ar: Any = None  # ONNX Runtime sessions, where the decoder asked for loads them
        self.step: Any = None
        self.cuda_graph = False
        if "ar_decoder" in manifest.graphs and decoder != "engine":
            self.ar = session(Path(folder) / manifest.graph("ar_decoder").file, providers)
        if "ar_step" in manifest.graphs and decoder != "concat":
            cuda = provider_name(providers[0]) == "CUDAExecutionProvider"
            self.step, self.cuda_graph = _step_session(
                Path(folder) / manifest.graph("ar_step").file, providers, cuda_graph and cuda, threads
            )
        self.head = session(Path(folder) / manifest.graph("fusion_head").file, providers)
        self.greedy: Any = None  # runtime/graphs/greedy.onnx's session, made where it is first needed
        self._greedy_session = functools.partial(session, GREEDY, providers)
        self.ar_lm_head = self.mlm_decoder = None
        if manifest.has_baseline_heads:
            self.ar_lm_head = session(Path(folder) / manifest.graph("ar_lm_head").file, providers)
            self.mlm_decoder = session(Path(folder) / manifest.graph("mlm_decoder").file, providers)
        sessions = {
            "mlm": self.mlm,
            "ar_decoder": self.ar,
            "ar_step": self.step,
            "fusion_head": self.head,
            "ar_lm_head": self.ar_lm_head,
            "mlm_decoder": self.mlm_decoder,
        }
        check_graphs(manifest, {name: session for name, session in sessions.items() if session is not None})
        self.device = "cuda" if provider_name(providers[0]) == "CUDAExecutionProvider" else "cpu"
        self.device_id = gpu_index(device) if self.device == "cuda" else 0
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self.dtype = DTYPES[manifest.dtype]
        if self.ar is not None:
            self.past_names = [n for n in manifest.graph("ar_decoder").inputs if n.startswith("past_key_values.")]
            self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        if self.step is not None:
            self.cache_names = (manifest.graph("ar_step").inputs[2:], manifest.graph("ar_step").outputs[1:])
        # on a device: the cache in device memory, the step's inputs and output in persistent device buffers (one
        # set per shape) and the engine's shapes fixed, so each shape's step can be captured as a CUDA graph
        self.on_device = self.device != "cpu"
        self._graph_ids = itertools.count(1)

    def _run(self, session: ort.InferenceSession, feeds: dict, device_outputs: Collection[str] = ()) -> dict:
        """Runs a session. Outputs named in device_outputs come back as OrtValues left where the session put
        them (with io_binding); all others as numpy arrays."""
        names = [o.name for o in session.get_outputs()]
        if not self.io_binding:
            return dict(zip(names, session.run(None, feeds)))
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in names:
            if name in device_outputs:
                binding.bind_output(name, self.device, self.device_id)
            else:
                binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: value if name in device_outputs else value.numpy() for name, value in zip(names, values)}

    def mlm_hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._run(self.mlm, {"input_ids": input_ids, "attention_mask": attention_mask})["hidden_states"]

    def empty_past(self, batch: int) -> Any:
        if self.ar is None:
            return self.new_cache(batch, 0)
        m = self.manifest
        empty = np.zeros((batch, m.num_key_value_heads, 0, m.head_dim), dtype=self.dtype)
        return {name: empty for name in self.past_names}

    def ar_step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Any
    ) -> tuple[np.ndarray, Any]:
        """Backend.ar_step. Without ar_decoder.onnx, on the step graph: position p's keys and values go to slot
        position p, so attention_mask is not read; that is the same attention wherever a row's padding sits at
        positions it has not reached yet (right padding, as every caller in the runtime feeds)."""
        if self.ar is None:
            needed = int(position_ids.max()) + 1
            if needed > past.capacity:
                past.resize(capacity_for(needed))
            return self.cache_step(input_ids, position_ids, past), past
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **past}
        outputs = self._run(self.ar, feeds, device_outputs=self.present_names)
        past = {p: outputs[q] for p, q in zip(self.past_names, self.present_names)}
        return outputs["last_hidden_state"], past

    def new_cache(self, slots: int, capacity: int) -> SlotCache:
        m = self.manifest
        if self.step is None:
            raise ValueError(
                "this bundle has no ar_step.onnx (exported before the decode engine); re-export it "
                "with `maria export`, or use the concat decoder"
            )
        return SlotCache(
            m.num_hidden_layers,
            m.num_key_value_heads,
            m.head_dim,
            self.dtype,
            slots,
            capacity,
            self.device,
            self.device_id,
            self.on_device,
            m.values_transposed,
        )

    def cache_step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache: SlotCache) -> np.ndarray:
        if self.on_device:
            return self._cache_step_in_place(input_ids, position_ids, cache)
        binding = cache.bindings.get(len(input_ids))  # kept with the buffers it binds (runtime/slots.py)
        if binding is None:
            binding = cache.bindings[len(input_ids)] = self.step.io_binding()
            cache.bind(binding, *self.cache_names, len(input_ids))
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        hidden = np.empty((*input_ids.shape, self.manifest.ar_hidden_size), dtype=self.dtype)  # the run writes it
        binding.bind_output("last_hidden_state", "cpu", 0, self.dtype, list(hidden.shape), hidden.ctypes.data)
        self.step.run_with_iobinding(binding)
        return hidden

    def _cache_step_in_place(self, input_ids: np.ndarray, position_ids: np.ndarray, cache: SlotCache) -> np.ndarray:
        """The step with its inputs and output in persistent buffers on the device, one set per (rows, width): a
        CUDA graph captured for a shape replays on the same addresses. The host copies the ids in and the hidden
        states out; the cache stays where it is."""
        rows, width = input_ids.shape
        entry = cache.bindings.get((rows, width))
        if entry is None:
            on_device = [
                ort.OrtValue.ortvalue_from_numpy(np.array(a, dtype=np.int64), self.device, self.device_id)
                for a in (input_ids, position_ids)
            ]
            hidden = ort.OrtValue.ortvalue_from_shape_and_type(
                [rows, width, self.manifest.ar_hidden_size], self.dtype, self.device, self.device_id
            )
            binding = self.step.io_binding()
            binding.bind_ortvalue_input("input_ids", on_device[0])
            binding.bind_ortvalue_input("position_ids", on_device[1])
            binding.bind_ortvalue_output("last_hidden_state", hidden)
            cache.bind(binding, *self.cache_names, rows)
            options = ort.RunOptions()
            if self.cuda_graph:
                options.add_run_config_entry("gpu_graph_id", str(next(self._graph_ids)))  # captured on first run
            entry = cache.bindings[rows, width] = (*on_device, hidden, binding, options)
        else:
            for value, array in zip(entry[:2], (input_ids, position_ids)):
                value.update_inplace(np.ascontiguousarray(array, dtype=np.int64))
        _, _, hidden, binding, options = entry
        self.step.run_with_iobinding(binding, options)
        return hidden.numpy()

    def _hidden(self, **hidden: np.ndarray) -> dict:
        """A head's feeds: hidden states by input name, contiguous in the bundle's dtype."""
        return {name: np.ascontiguousarray(value, dtype=self.dtype) for name, value in hidden.items()}

    def fuse(self, mlm_hidden: np.ndarray, ar_hidden: np.ndarray) -> np.ndarray:
        return self._run(self.head, self._hidden(mlm_hidden=mlm_hidden, ar_hidden=ar_hidden))["logits"]

    def fuse_best(
        self, mlm_hidden: np.ndarray, ar_hidden: np.ndarray, banned: list[int], refused: list | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The greedy choice from the fusion head's logits (runtime/choose.py's best_tokens): ids [r] and their
        log-probabilities [r]. With io_binding the logits stay where the head wrote them (device memory on a
        GPU) and only the ids and log-probabilities come back."""
        if not self.io_binding:
            return best_tokens(self.fuse(mlm_hidden, ar_hidden), banned, refused)
        feeds = self._hidden(mlm_hidden=mlm_hidden, ar_hidden=ar_hidden)
        return self._best(self.head, feeds, banned, refused, "logprobs")

    def mlm_best(self, mlm_hidden: np.ndarray, banned: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The MLM head's best id at each row that is not banned, and its log-probability among the ids not banned:
        speculative infilling's greedy drafts and how sure the head is of them; needs the baseline heads."""
        if not self.io_binding:
            return best_tokens(self.mlm_logits(mlm_hidden), banned, allowed=True)
        feeds = self._hidden(mlm_hidden=mlm_hidden)
        return self._best(self._baseline("mlm_decoder"), feeds, banned, None, "allowed_logprobs")

    def _best(
        self, session: ort.InferenceSession, feeds: dict, banned: list[int], refused: list | None, logprobs: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """A head's logits left where it wrote them, and greedy.onnx's choice from them on the same device."""
        logits = self._run(session, feeds, device_outputs=("logits",))["logits"]
        if self.greedy is None:
            self.greedy = self._greedy_session()
        rows = logits.shape()[0]
        chosen = self._run(self.greedy, {"logits": logits, "refused": refused_matrix(banned, refused, rows)})
        return chosen["ids"], chosen[logprobs].astype(np.float64)

    def ar_logits(self, ar_hidden: np.ndarray) -> np.ndarray:
        """The AR's own next-token logits: ar_hidden [r, d_ar] -> [r, V] (fp32); needs the baseline heads."""
        return self._run(self._baseline("ar_lm_head"), self._hidden(ar_hidden=ar_hidden))["logits"]

    def mlm_logits(self, mlm_hidden: np.ndarray) -> np.ndarray:
        """The MLM's own logits: mlm_hidden [r, d_mlm] -> [r, V] (fp32); needs the baseline heads."""
        return self._run(self._baseline("mlm_decoder"), self._hidden(mlm_hidden=mlm_hidden))["logits"]

    def _baseline(self, name: str) -> ort.InferenceSession:
        session = self.ar_lm_head if name == "ar_lm_head" else self.mlm_decoder
        if session is None:
            raise ValueError(
                f"this bundle has no {name}.onnx (exported with --no-baseline-heads); re-export it "
                "with `maria export` to score whole texts"
            )
        return session
