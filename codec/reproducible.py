"""safetensors files that are byte-identical for identical contents.

The safetensors writer keeps the header's ``__metadata__`` in a hash map, so two runs that store
the same tensors and the same metadata write the metadata keys in different orders: the files
differ from byte 27 and their sha256 (in our manifests) differ, although nothing else does. Here
the header is written again with sorted keys and no spaces, padded to 8 bytes as the format asks
(offsets in the header are relative to the data, so they stay valid).
"""

from __future__ import annotations

import json
import os
import struct

import torch


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return canonical(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def canonical(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in sorted key order."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    with open(path, "wb") as fh:
        fh.write(safetensors_bytes(tensors, metadata))
