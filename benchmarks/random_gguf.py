"""A GGUF file shaped like another one (same metadata, tokenizer, tensor names, shapes and quantization
types) with random weights: for timing where the real file cannot be installed or copied (only the
0.4 MB export of its metadata has to get there). Loading, de-quantizing and running it cost what the real file costs; its
numbers mean nothing.

    python benchmarks/random_gguf.py export --gguf MODEL.gguf --to skeleton.json.gz   # metadata only (~2 MB)
    python benchmarks/random_gguf.py build --skeleton skeleton.json.gz --to random.gguf [--seed 0]

Quantized blocks get random 4- or 8-bit codes and a fixed small scale (weights of about 0.02 std);
F32 tensors (the norms) are ones. Supported block types: Q4_0, Q4_1, Q8_0, and F32/F16 tensors.
"""

from __future__ import annotations

import argparse
import gzip
import json

import numpy as np

SCALE = 0.005  # the block scale d: 4-bit codes span [-8d, 7d], 8-bit codes (-127..127) d * code / 16


def export(gguf_path: str, to: str) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    kv = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes these itself
        types = [int(t) for t in field.types]
        kv.append([key, types[0], types[1] if len(types) > 1 else None, field.contents()])
    arch = reader.fields["general.architecture"].contents()
    tensors = [[t.name, [int(x) for x in t.shape], int(t.tensor_type)] for t in reader.tensors]
    with gzip.open(to, "wt") as f:
        json.dump({"architecture": arch, "kv": kv, "tensors": tensors}, f)


def _blocks(kind: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """(n_blocks, bytes per block) uint8 of valid, finite blocks."""
    d = np.full(n_blocks, SCALE, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    if kind == "Q4_0":
        return np.concatenate([d, rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)], 1)
    if kind == "Q4_1":
        m = np.full(n_blocks, -8 * SCALE, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
        return np.concatenate([d, m, rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)], 1)
    if kind == "Q8_0":
        d = np.full(n_blocks, SCALE / 16, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
        return np.concatenate([d, rng.integers(-127, 128, (n_blocks, 32), dtype=np.int8).view(np.uint8)], 1)
    raise SystemExit(f"block type {kind} is not supported by this generator")


def build(skeleton: str, to: str, seed: int) -> None:
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    with gzip.open(skeleton, "rt") as f:
        doc = json.load(f)
    writer = GGUFWriter(to, doc["architecture"])
    for key, vtype, sub_type, value in doc["kv"]:
        writer.add_key_value(key, value, GGUFValueType(vtype), None if sub_type is None else GGUFValueType(sub_type))
    rng = np.random.default_rng(seed)
    for name, shape, qtype in doc["tensors"]:
        kind = GGMLQuantizationType(qtype)
        numpy_shape = tuple(reversed(shape))  # GGUF lists the fastest dimension first
        if kind.name in ("F32", "F16"):
            data = np.ones(numpy_shape, dtype=np.float32 if kind.name == "F32" else np.float16)
            writer.add_tensor(name, data)
            continue
        rows, cols = int(np.prod(numpy_shape[:-1])), numpy_shape[-1]
        data = _blocks(kind.name, rows * cols // 32, rng).reshape(rows, -1)
        writer.add_tensor(name, data, raw_dtype=kind)  # (rows, bytes per row): the writer derives the shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--gguf", required=True)
    e.add_argument("--to", required=True)
    b = sub.add_parser("build")
    b.add_argument("--skeleton", required=True)
    b.add_argument("--to", required=True)
    b.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "export":
        export(args.gguf, args.to)
    else:
        build(args.skeleton, args.to, args.seed)


if __name__ == "__main__":
    main()
