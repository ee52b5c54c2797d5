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

from .manifest import Manifest
from .sessions import make_session, providers_for

DTYPES = {"fp32": np.float32, "fp16": np.float16}


class OnnxBackend:
    def __init__(self, folder: Path, manifest: Manifest, device: str = "auto", io_binding: bool | None = None):
        providers = providers_for(device)
        self.manifest = manifest
        self.mlm = make_session(Path(folder) / manifest.graph("mlm").file, providers, insist=device == "cuda")
        providers = self.mlm.get_providers()       # after a CUDA fallback, the rest start on CPU directly
        self.ar = make_session(Path(folder) / manifest.graph("ar_decoder").file, providers)
        self.head = make_session(Path(folder) / manifest.graph("fusion_head").file, providers)
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
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
            binding.bind_output(name, self.device if name in device_outputs else "cpu")
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
