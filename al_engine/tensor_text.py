"""The one codec for tensors saved inside JSON (run state files, the annotator database): a state
dict as base64 text of `torch.save`, read back with `weights_only=True` (no code runs on load)."""
from __future__ import annotations

import base64
import io

import torch


def encode_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """A state dict (any device) -> ASCII text; the tensors are saved from the CPU."""
    buffer = io.BytesIO()
    torch.save({name: tensor.detach().cpu() for name, tensor in tensors.items()}, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_tensors(text: str) -> dict[str, torch.Tensor]:
    """The state dict `encode_tensors` wrote, on the CPU."""
    return torch.load(io.BytesIO(base64.b64decode(text)), map_location="cpu", weights_only=True)
