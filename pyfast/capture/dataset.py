"""`pyfast.ActivationDataset`: the samples of a capture folder, streamed from its shards.

    dataset = pyfast.ActivationDataset("runs/capture")
    sample = dataset[0]     # {"__key__": "...", "encoder.layer.0": tensor, ...}
    loader = DataLoader(dataset, batch_size=64, num_workers=2)

Shards are memory-mapped (copy-on-write) when first touched and their checksum is verified then,
once per process; a shard that fails is a ShardCorruptError naming the file, never data. At most
`max_open` shards stay mapped per process (least recently used first out), so reading a capture in
order keeps memory flat. Items are copies, safe to keep and modify. The dataset pickles without its
open shards, so DataLoader workers map their own.
"""

from __future__ import annotations

import bisect
import fnmatch
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from pyfast.capture import manifest as mf
from pyfast.capture.errors import CaptureError
from pyfast.capture.layers import split_patterns, unknown_pattern_message
from pyfast.capture.shards import open_shard

KEY_FIELD = "__key__"


class ActivationDataset(Dataset):
    """The captured samples of the folder `root`, one dict per sample: layer name -> tensor of the
    per-sample shape, plus `__key__` (the sample's key).

    layers: names or fnmatch patterns of the layers to return (default: all). dtype: cast to this
    dtype (default: as stored, float16 or bfloat16). verify: check each shard's checksum when it
    is first opened (default True). partial: read a capture that has not completed (its completed
    shards); by default that is an error, so a stopped capture is not mistaken for a whole one.
    """

    def __init__(
        self,
        root,
        *,
        layers: Optional[Sequence[str]] = None,
        dtype: Optional[torch.dtype] = None,
        verify: bool = True,
        partial: bool = False,
        max_open: int = 2,
    ):
        self.root = os.fspath(root)
        manifest = mf.read_manifest(self.root)
        if manifest is None:
            raise CaptureError(f"{self.root}: no {mf.MANIFEST_FILE}; not a pyfast-capture folder")
        self.entries: List[dict] = mf.read_shard_log(self.root)
        if manifest.get("status") != mf.STATUS_COMPLETE and not partial:
            raise CaptureError(
                f"{self.root}: the capture is not complete ({len(self.entries):,} shards so far): rerun the same "
                "pyfast-capture command to finish it, or pass partial=True to read the shards done"
            )
        if manifest.get("status") == mf.STATUS_COMPLETE and manifest["totals"]["shards"] != len(self.entries):
            raise CaptureError(
                f"{self.root}: {mf.SHARD_LOG_FILE} lists {len(self.entries):,} shards, the manifest "
                f"{manifest['totals']['shards']:,}; rerun the capture to repair it"
            )
        self.manifest = manifest
        self.run = manifest["run"]
        self.stored_dtype = getattr(torch, manifest["storage"]["dtype"])
        self.dtype = dtype
        self.verify = bool(verify)
        self.max_open = max(1, int(max_open))
        self.all_layers: Dict[str, tuple] = {t["name"]: tuple(t["shape"]) for t in manifest["layers"]["tensors"]}
        self.layers: Dict[str, tuple] = self._select(layers)
        self._starts: List[int] = []
        count = 0
        for entry in self.entries:
            self._starts.append(count)
            count += entry["samples"]
        self._length = count
        self._open: "OrderedDict[int, Dict[str, torch.Tensor]]" = OrderedDict()

    def _select(self, layers) -> Dict[str, tuple]:
        if layers is None:
            return dict(self.all_layers)
        chosen = set()
        names = list(self.all_layers)
        for pattern in split_patterns(layers):
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise CaptureError(f"layers: {unknown_pattern_message(pattern, names, 'captured layer')}")
            chosen.update(matched)
        return {n: s for n, s in self.all_layers.items() if n in chosen}

    # -- Dataset

    def __len__(self) -> int:
        return self._length

    def locate(self, index: int) -> tuple:
        """Sample index -> (shard number, row in that shard)."""
        index = int(index)
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for a capture of {self._length} samples")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def __getitem__(self, index: int) -> dict:
        shard, row = self.locate(index)
        tensors = self._tensors(shard)
        item = {KEY_FIELD: self.entries[shard]["keys"][row]}
        for name in self.layers:
            value = tensors[name][row]
            item[name] = value.to(self.dtype) if self.dtype is not None and self.dtype != value.dtype else value.clone()
        return item

    # -- metadata

    def sample_info(self, index: int) -> dict:
        """Where sample `index` came from: key, source, file and its index in the data set."""
        shard, row = self.locate(index)
        entry = self.entries[shard]
        return {"key": entry["keys"][row], "source": entry["sources"][row], "file": entry["files"][row],
                "data_index": entry["indices"][row], "shard": shard}

    @property
    def stats(self) -> Dict[str, dict]:
        """Per layer over all shards: non-finite values stored, values clipped (overflow), max |x|."""
        out = {name: {"nonfinite": 0, "overflow": 0, "absmax": 0.0} for name in self.all_layers}
        for entry in self.entries:
            for name, s in entry["stats"].items():
                out[name]["nonfinite"] += s["nonfinite"]
                out[name]["overflow"] += s["overflow"]
                out[name]["absmax"] = max(out[name]["absmax"], s["absmax"])
        return out

    def shard(self, number: int) -> Dict[str, torch.Tensor]:
        """All samples of one shard at once: name -> (samples, *shape) (copies of the chosen layers)."""
        tensors = self._tensors(int(number))
        return {name: tensors[name].clone() if self.dtype is None else tensors[name].to(self.dtype)
                for name in self.layers}

    # -- shards

    def _tensors(self, shard: int) -> Dict[str, torch.Tensor]:
        tensors = self._open.get(shard)
        if tensors is not None:
            self._open.move_to_end(shard)
            return tensors
        if not 0 <= shard < len(self.entries):
            raise IndexError(f"shard {shard} out of range ({len(self.entries)} shards)")
        tensors = open_shard(self.root, self.entries[shard], layers=self.all_layers, dtype=self.stored_dtype,
                             run=self.run, verify=self.verify)
        self._open[shard] = tensors
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)  # unmapped once no view of it is left
        return tensors

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # workers map their own shards
        return state

    def __repr__(self) -> str:
        return f"ActivationDataset({self.root!r}, {self._length} samples, {len(self.entries)} shards, {len(self.layers)} layers)"
