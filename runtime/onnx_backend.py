"""The decode loop's `Backend` (runtime/backend.py) on ONNX Runtime: three sessions, created once per bundle.

With io_binding (the default on CUDA), the KV cache lives in OrtValues on the device between steps: each
step's `present.*` outputs are bound as the next step's `past_key_values.*` inputs, never copied to the host.
What crosses to the host per step is small: the step's last_hidden_state rows and the fusion head's logits
(tokens are chosen on the host). Without io_binding every tensor goes through numpy; both paths are one code
path around `_run`, so tests compare them.
"""

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .manifest import REEXPORT, Manifest
from .device import gpu_index
from .sessions import make_session, provider_name, providers_for

DTYPES = {"fp32": np.float32, "fp16": np.float16}
ELEMENTS = {"fp32": "tensor(float)", "fp16": "tensor(float16)"}


def _declared(session) -> dict:
    """name -> (element type, shape) of every input and output a session declares."""
    return {value.name: (value.type, value.shape) for value in [*session.get_inputs(), *session.get_outputs()]}


def check_graphs(manifest: Manifest, sessions: dict) -> None:
    """Checks the manifest against what the graphs declare (names, element types, fixed dimensions); raises
    ValueError naming the first difference."""
    m, element = manifest, ELEMENTS[manifest.dtype]
    expected = {"mlm": {"hidden_states": (element, {-1: m.mlm_hidden_size})},
                "ar_decoder": {"last_hidden_state": (element, {-1: m.ar_hidden_size})},
                "fusion_head": {"mlm_hidden": (element, {-1: m.mlm_hidden_size}),
                                "ar_hidden": (element, {-1: m.ar_hidden_size}),
                                "logits": ("tensor(float)", {-1: m.vocab_size})}}
    if m.has_baseline_heads:
        expected["ar_lm_head"] = {"ar_hidden": (element, {-1: m.ar_hidden_size}),
                                  "logits": ("tensor(float)", {-1: m.vocab_size})}
        expected["mlm_decoder"] = {"mlm_hidden": (element, {-1: m.mlm_hidden_size}),
                                   "logits": ("tensor(float)", {-1: m.vocab_size})}
    for name in (n for n in m.graph("ar_decoder").inputs if n.startswith("past_key_values.")):
        expected["ar_decoder"][name] = (element, {1: m.num_key_value_heads, 3: m.head_dim})
    for graph, session in sessions.items():
        declared, spec = _declared(session), m.graph(graph)
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if names != (list(spec.inputs), list(spec.outputs)):
            raise ValueError(f"{spec.file} takes {names[0]} and gives {names[1]}, but the manifest says "
                             f"{spec.inputs} and {spec.outputs}; {REEXPORT}")
        for tensor, (kind, dims) in expected[graph].items():
            found_kind, shape = declared[tensor]
            wrong = {axis: shape[axis] for axis, size in dims.items()
                     if isinstance(shape[axis], int) and shape[axis] != size}
            if found_kind != kind or wrong:
                raise ValueError(f"{spec.file} '{tensor}' is {found_kind} {shape}, but the manifest describes "
                                 f"{kind} with sizes {dims} (axis: size); {REEXPORT}")
    layers = sum(n.startswith("past_key_values.") for n in m.graph("ar_decoder").inputs) // 2
    if layers != m.num_hidden_layers:
        raise ValueError(f"ar_decoder has the KV cache of {layers} layers, but the manifest says "
                         f"{m.num_hidden_layers}; {REEXPORT}")


class OnnxBackend:
    def __init__(self, folder: Path, manifest: Manifest, device: str = "auto", io_binding: bool | None = None):
        providers = providers_for(device)
        self.manifest = manifest
        self.mlm = make_session(Path(folder) / manifest.graph("mlm").file, providers,
                                insist=device not in ("auto", "cpu"))
        if self.mlm.get_providers()[0] != provider_name(providers[0]):
            providers = ["CPUExecutionProvider"]   # after a CUDA fallback, the rest start on CPU directly
        self.ar = make_session(Path(folder) / manifest.graph("ar_decoder").file, providers)
        self.head = make_session(Path(folder) / manifest.graph("fusion_head").file, providers)
        self.ar_lm_head = self.mlm_decoder = None
        if manifest.has_baseline_heads:
            self.ar_lm_head = make_session(Path(folder) / manifest.graph("ar_lm_head").file, providers)
            self.mlm_decoder = make_session(Path(folder) / manifest.graph("mlm_decoder").file, providers)
        check_graphs(manifest, {"mlm": self.mlm, "ar_decoder": self.ar, "fusion_head": self.head,
                                **({"ar_lm_head": self.ar_lm_head, "mlm_decoder": self.mlm_decoder}
                                   if manifest.has_baseline_heads else {})})
        self.device = "cuda" if provider_name(providers[0]) == "CUDAExecutionProvider" else "cpu"
        self.device_id = gpu_index(device) if self.device == "cuda" else 0
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self.dtype = DTYPES[manifest.dtype]
        self.past_names = [n for n in manifest.graph("ar_decoder").inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]

    def _run(self, session, feeds: dict, device_outputs=()) -> dict:
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

    def mlm_hidden(self, input_ids, attention_mask):
        return self._run(self.mlm, {"input_ids": input_ids, "attention_mask": attention_mask})["hidden_states"]

    def empty_past(self, batch: int) -> dict:
        m = self.manifest
        empty = np.zeros((batch, m.num_key_value_heads, 0, m.head_dim), dtype=self.dtype)
        return {name: empty for name in self.past_names}

    def ar_step(self, input_ids, attention_mask, position_ids, past):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **past}
        outputs = self._run(self.ar, feeds, device_outputs=self.present_names)
        past = {p: outputs[q] for p, q in zip(self.past_names, self.present_names)}
        return outputs["last_hidden_state"], past

    def fuse(self, mlm_hidden, ar_hidden):
        feeds = {"mlm_hidden": np.ascontiguousarray(mlm_hidden, dtype=self.dtype),
                 "ar_hidden": np.ascontiguousarray(ar_hidden, dtype=self.dtype)}
        return self._run(self.head, feeds)["logits"]

    def ar_logits(self, ar_hidden):
        """The AR's own next-token logits: ar_hidden [r, d_ar] -> [r, V] (fp32); needs the baseline heads."""
        return self._run(self._baseline("ar_lm_head"), {"ar_hidden": np.ascontiguousarray(ar_hidden,
                                                                                           dtype=self.dtype)})["logits"]

    def mlm_logits(self, mlm_hidden):
        """The MLM's own logits: mlm_hidden [r, d_mlm] -> [r, V] (fp32); needs the baseline heads."""
        return self._run(self._baseline("mlm_decoder"), {"mlm_hidden": np.ascontiguousarray(mlm_hidden,
                                                                                             dtype=self.dtype)})["logits"]

    def _baseline(self, name: str):
        session = self.ar_lm_head if name == "ar_lm_head" else self.mlm_decoder
        if session is None:
            raise ValueError(f"this bundle has no {name}.onnx (exported with --no-baseline-heads); re-export it "
                             "with `maria export` to score whole texts")
        return session
