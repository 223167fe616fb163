#!/usr/bin/env python3
"""Convert a legacy (pre-zip, "torch.save(..., _use_new_zipfile_serialization=False)") PyTorch
state dict into a .safetensors file, with the Python standard library only (no torch, no numpy).

The legacy format is a sequence of pickles followed by raw storage bytes:
  1. the magic number 0x1950a86a20f9469cfc6c
  2. the protocol version (1001)
  3. a sys-info dict (endianness, C type sizes)
  4. the object itself; tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size,
     stride, ...)` calls whose storages are persistent ids
     `('storage', StorageType, key, location, numel, view_metadata)`
  5. the list of storage keys, in the order their data follows
  6. for each key: an int64 element count, then count * element-size little-endian bytes.

Usage: torch_legacy_to_safetensors.py IN.pt OUT.safetensors [--member PATH_IN_ZIP]
IN may be a .whl/.zip, in which case --member names the file inside it.
The output is written to a temporary file and renamed, so it is never half-written.
"""

import argparse
import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile

MAGIC = 0x1950A86A20F9469CFC6C

# storage class name -> (safetensors dtype, element size in bytes, struct code)
STORAGES = {
    "FloatStorage": ("F32", 4, "f"),
    "DoubleStorage": ("F64", 8, "d"),
    "HalfStorage": ("F16", 2, "e"),
    "LongStorage": ("I64", 8, "q"),
    "IntStorage": ("I32", 4, "i"),
    "ShortStorage": ("I16", 2, "h"),
    "CharStorage": ("I8", 1, "b"),
    "ByteStorage": ("U8", 1, "B"),
    "BoolStorage": ("BOOL", 1, "?"),
}


class StorageType:
    def __init__(self, name):
        if name not in STORAGES:
            raise ValueError(f"unsupported storage type torch.{name}")
        self.name = name
        self.dtype, self.itemsize, self.code = STORAGES[name]


class TensorRef:
    """A tensor as a view (offset, size, stride) into a storage, resolved once data is read."""

    def __init__(self, storage_id, offset, size, stride):
        self.storage_id = storage_id
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)


def rebuild_tensor(storage_id, offset, size, stride, *_rest):
    return TensorRef(storage_id, offset, size, stride)


def rebuild_parameter(tensor, *_rest):
    return tensor


class LegacyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return rebuild_parameter
        if module == "torch" and name in STORAGES:
            return StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel, view = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id kind {kind!r}")
        if view is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        return (key, storage_type, numel)


def contiguous_strides(size):
    strides, acc = [], 1
    for dim in reversed(size):
        strides.append(acc)
        acc *= dim
    return tuple(reversed(strides))


def tensor_bytes(ref, storages):
    key, storage_type, _numel = ref.storage_id
    data = storages[key]
    item = storage_type.itemsize
    count = 1
    for dim in ref.size:
        count *= dim
    if ref.stride == contiguous_strides(ref.size) or count <= 1:
        start = ref.offset * item
        return storage_type.dtype, data[start : start + count * item]
    # Non-contiguous view: gather element by element (rare in state dicts).
    out = bytearray()
    index = [0] * len(ref.size)
    for _ in range(count):
        pos = ref.offset + sum(i * s for i, s in zip(index, ref.stride))
        out += data[pos * item : (pos + 1) * item]
        for d in reversed(range(len(index))):
            index[d] += 1
            if index[d] < ref.size[d]:
                break
            index[d] = 0
    return storage_type.dtype, bytes(out)


def load_legacy(raw):
    f = io.BytesIO(raw)
    magic = pickle.load(f)
    if magic != MAGIC:
        raise ValueError("not a legacy torch file (wrong magic number); zip-format files need torch")
    protocol = pickle.load(f)
    if protocol != 1001:
        raise ValueError(f"unsupported legacy protocol version {protocol}")
    sys_info = pickle.load(f)
    if not sys_info.get("little_endian", True):
        raise ValueError("big-endian files are not supported")
    obj = LegacyUnpickler(f).load()
    keys = pickle.load(f)
    types = {}

    def collect(o):
        if isinstance(o, TensorRef):
            types[o.storage_id[0]] = o.storage_id[1]
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)

    collect(obj)
    storages = {}
    for key in keys:
        (numel,) = struct.unpack("<q", f.read(8))
        storage_type = types.get(key)
        if storage_type is None:
            raise ValueError(f"storage {key} has no tensor referring to it")
        nbytes = numel * storage_type.itemsize
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise ValueError(f"file truncated in storage {key}")
        storages[key] = data
    return obj, storages


def flatten(obj, prefix=""):
    """Yield (name, TensorRef) for a (possibly nested) state dict."""
    if isinstance(obj, TensorRef):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))


def write_safetensors(tensors, path, metadata):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        dtype, shape, blob = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((8 - len(head) % 8) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(head)))
        out.write(head)
        for blob in blobs:
            out.write(blob)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--member", help="file inside a .whl/.zip input")
    args = ap.parse_args()
    if args.member:
        with zipfile.ZipFile(args.input) as z:
            raw = z.read(args.member)
        source = f"{os.path.basename(args.input)}:{args.member}"
    else:
        with open(args.input, "rb") as fh:
            raw = fh.read()
        source = os.path.basename(args.input)
    obj, storages = load_legacy(raw)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    tensors = {}
    for name, ref in flatten(obj):
        dtype, blob = tensor_bytes(ref, storages)
        tensors[name] = (dtype, ref.size, blob)
    if not tensors:
        raise ValueError("no tensors found")
    write_safetensors(tensors, args.output, {"format": "pt", "source": source})
    print(f"wrote {len(tensors)} tensors to {args.output}")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
