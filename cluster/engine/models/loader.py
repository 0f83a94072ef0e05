"""Build a model from a Hugging Face checkpoint folder (config.json + *.safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from cluster.engine.attention import TorchPagedAttention
from cluster.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig
from cluster.engine.models.llama import LlamaForCausalLM
from cluster.engine.parallel import PPStage, TPGroup

MODEL_CLASSES = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


class SafetensorsCheckpoint:
    """Name -> tensor over every *.safetensors file of a folder, read lazily one at a time."""

    def __init__(self, model_dir: str | Path):
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise ValueError(f"{model_dir} has no *.safetensors weights file")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def get(self, name: str) -> torch.Tensor:
        handle = self._where.get(name)
        if handle is None:
            raise KeyError(name)
        return handle.get_tensor(name)


def load_model(
    config: ModelConfig,
    backend: TorchPagedAttention,
    dtype: torch.dtype,
    device: torch.device,
    max_len: int,
    tp: TPGroup | None = None,
    pp: PPStage | None = None,
) -> LlamaForCausalLM:
    checkpoint = SafetensorsCheckpoint(config.path)
    with torch.device(device):
        model = MODEL_CLASSES[config.architecture](
            config, backend, max_len, tp or TPGroup(), pp or PPStage()
        )
    model.load_weights(checkpoint.get)
    # RoPE tables were computed in fp32; casting them now equals transformers' per-step cast.
    return model.to(dtype=dtype).eval()
