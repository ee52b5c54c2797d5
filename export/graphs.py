"""The graphs of a bundle, each declared once: its module, its inputs and outputs, its dynamic axes.

The backbones go through Optimum's ONNX exporter (optimum-onnx), so every architecture Optimum knows
exports through one path; only two things are ours:
  - the outputs: hidden states instead of the vocabulary projection (the MLM's head transform output; the AR
    base model's last_hidden_state with its KV cache: Optimum's "feature-extraction-with-past" task);
  - the fusion head, a single linear layer Optimum has no config for, exported with torch.onnx;
  - the baseline heads (optional): the AR's LM head and the MLM's vocabulary decoder, each a linear layer over
    the hidden states the other graphs already give, so the runtime has the AR's own likelihood and the
    MLM-alone and product-of-experts predictions without PyTorch.
"""

import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from optimum.exporters.onnx.convert import export as optimum_export
from optimum.exporters.tasks import TasksManager

from maria_onnx.backbones import Backbones
from maria_onnx.model import FusionHead, VocabularyHead

from .weights import exporting

MLM_FILE, AR_FILE, HEAD_FILE = "mlm.onnx", "ar_decoder.onnx", "fusion_head.onnx"
AR_LM_HEAD_FILE, MLM_DECODER_FILE = "ar_lm_head.onnx", "mlm_decoder.onnx"


class MlmHidden(torch.nn.Module):
    """The MLM up to its prediction-head transform: [batch, seq] -> hidden_states [batch, seq, d_mlm]."""

    def __init__(self, backbones: Backbones):
        super().__init__()
        self.backbones, self.config = backbones, backbones.mlm.config

    def forward(self, input_ids, attention_mask):
        return {"hidden_states": self.backbones.mlm_hidden(input_ids, attention_mask)}


def _optimum_config(model, task: str):
    """Optimum's OnnxConfig class for this architecture and task; a clear error where Optimum has none."""
    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model=model, task=task, library_name="transformers"
        )
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"Optimum cannot export a '{model.config.model_type}' model for {task} ({error}); "
            "use a supported architecture"
        ) from None
    return type(constructor(model.config))


def mlm_onnx_config(backbones: Backbones):
    base = _optimum_config(backbones.mlm, "feature-extraction")

    class MlmHiddenOnnxConfig(base):
        @property
        def outputs(self):
            return OrderedDict({"hidden_states": {0: "batch_size", 1: "sequence_length"}})

    return MlmHiddenOnnxConfig(backbones.mlm.config, task="feature-extraction")


def ar_onnx_config(backbones: Backbones):
    base = _optimum_config(backbones.ar.base_model, "feature-extraction-with-past")

    class ArDecoderOnnxConfig(base):
        @property
        def outputs(self):  # Optimum fixes the sequence axis of a with-past step to 1; ours also prefills
            outputs = OrderedDict({"last_hidden_state": {0: "batch_size", 1: "sequence_length"}})
            self.add_past_key_values(outputs, direction="outputs")
            return outputs

    return ArDecoderOnnxConfig(backbones.ar.config, task="feature-extraction", use_past=True, use_past_in_inputs=True)


def export_backbones(backbones: Backbones, folder: Path, opset: int, concat_decoder: bool = True) -> dict:
    """Writes mlm.onnx and (with concat_decoder) ar_decoder.onnx, fp32, with Optimum; returns graph name ->
    (inputs, outputs)."""
    specs = {}
    graphs = [("mlm", MLM_FILE, MlmHidden(backbones).eval(), mlm_onnx_config(backbones))]
    if concat_decoder:
        graphs.append(("ar_decoder", AR_FILE, backbones.ar.base_model.eval(), ar_onnx_config(backbones)))
    for name, file, module, config in graphs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with exporting(folder, file) as path:
                inputs, outputs = optimum_export(module, config, path, opset=opset)
        specs[name] = (list(inputs), list(outputs))
    return specs


class FusionHeadGraph(torch.nn.Module):
    def __init__(self, head: FusionHead):
        super().__init__()
        self.head = head

    def forward(self, mlm_hidden, ar_hidden):
        return self.head(mlm_hidden, ar_hidden)  # the head casts to fp32: logits stay fp32


def export_fusion_head(head: FusionHead, folder: Path, opset: int, hidden_dtype=torch.float32) -> tuple:
    """Writes fusion_head.onnx: mlm_hidden [batch, d_mlm], ar_hidden [batch, d_ar] -> logits [batch, V] fp32."""
    mlm_hidden = torch.zeros(2, head.mlm_hidden_size, dtype=hidden_dtype)
    ar_hidden = torch.zeros(2, head.linear.in_features - head.mlm_hidden_size, dtype=hidden_dtype)
    inputs, outputs = ["mlm_hidden", "ar_hidden"], ["logits"]
    with exporting(folder, HEAD_FILE) as path:
        torch.onnx.export(
            FusionHeadGraph(head.float().eval()),
            (mlm_hidden, ar_hidden),
            str(path),
            input_names=inputs,
            output_names=outputs,
            opset_version=opset,
            dynamo=False,
            dynamic_axes={name: {0: "batch_size"} for name in inputs + outputs},
        )
    return inputs, outputs


def export_baseline_heads(backbones: Backbones, folder: Path, opset: int, hidden_dtype=torch.float32) -> dict:
    """Writes ar_lm_head.onnx (ar_hidden -> logits) and mlm_decoder.onnx (mlm_hidden -> logits), logits fp32 over
    the AR's vocabulary; returns graph name -> (inputs, outputs)."""
    specs = {}
    for name, file, linear, input_name, width in (
        ("ar_lm_head", AR_LM_HEAD_FILE, backbones.ar.get_output_embeddings(), "ar_hidden", backbones.ar_hidden_size),
        ("mlm_decoder", MLM_DECODER_FILE, backbones.mlm_decoder(), "mlm_hidden", backbones.mlm_hidden_size),
    ):
        module = VocabularyHead(linear, backbones.vocab_size).eval()  # computes in fp32 itself
        with exporting(folder, file) as path:
            torch.onnx.export(
                module,
                (torch.zeros(2, width, dtype=hidden_dtype),),
                str(path),
                input_names=[input_name],
                output_names=["logits"],
                opset_version=opset,
                dynamo=False,
                dynamic_axes={input_name: {0: "batch_size"}, "logits": {0: "batch_size"}},
            )
        specs[name] = ([input_name], ["logits"])
    return specs
