"""One ONNX detector from several: the mean of their P(generated), in a single graph.

    ensemble_onnx(["resnet32.onnx", "origin-class.onnx"], "detector.onnx")

Members are fakecifar ONNX models with a real/fake split in their classes (2-class `origin`, or
20-class `origin+class`, whose fake/* columns are summed). Each member's softmax is mapped onto
(real, fake) by a constant matrix, the members are averaged with equal weights (none is tuned,
so nothing is chosen on the data the ensemble is scored on), and the output `logits` is the log
of that mean, so softmax(logits) gives it back and every consumer of a fakecifar ONNX model
(`detect`, `eval`, `confusion`) reads it unchanged.

`fp16_weights` stores large float32 initializers as float16 with a Cast back to float32 beside
them: half the bytes, while onnxruntime still computes in float32 (an optimized session folds
the casts at open; an unoptimized one, for a few images, runs them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import ONNX_FORMAT, VERSION, load_onnx
from .detect import fake_columns
from .errors import BadCheckpointError, UsageError
from .outputs import write_atomically
from .text import format_size

if TYPE_CHECKING:
    import onnx

__all__ = ["ENSEMBLE_ARCH", "ORIGIN_CLASSES", "ensemble_onnx", "fp16_weights"]

ENSEMBLE_ARCH = "ensemble"
ORIGIN_CLASSES = ("real", "fake")
# Initializers this small (biases, shapes, scalars) stay float32: no bytes to save, and a
# shape or an axis must keep its type.
_FP16_MIN_ELEMENTS = 64
# log(0) would make a -inf logit; a floor far below any probability a model gives keeps it finite.
_P_FLOOR = 1e-30


def _load_member(path: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    proto, meta = load_onnx(path)
    graph = proto.graph
    if [i.name for i in graph.input] != ["image"] or [o.name for o in graph.output] != ["logits"]:
        raise BadCheckpointError(
            f"{path}: expected one input 'image' and one output 'logits'", "export it with fakecifar train --onnx"
        )
    if any(attr.g.node or attr.graphs for node in graph.node for attr in node.attribute):
        raise BadCheckpointError(f"{path}: has control-flow subgraphs, which an ensemble does not merge")
    return proto, meta


def _origin_matrix(classes: Sequence[str]) -> np.ndarray:
    """[K, 2]: column 0 sums the real classes, column 1 the fake ones."""
    fake = fake_columns(list(classes))
    return np.stack([~fake, fake], axis=1).astype(np.float32)


def ensemble_onnx(members: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, fp16: bool = True) -> Path:
    """Write one ONNX model whose P(fake) is the mean of the members'; returns the path.

    Members must share the input size and the default-domain opset. With `fp16`, weights are
    stored as float16 (see `fp16_weights`). Written atomically.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    paths = [Path(m) for m in members]
    if len(paths) < 2:
        raise UsageError("an ensemble needs at least two member models")
    loaded = [_load_member(p) for p in paths]
    sizes = {tuple(meta["input_size"]) for _, meta in loaded}
    if len(sizes) > 1:
        found = ", ".join(f"{p}: {format_size(m['input_size'])}" for p, (_, m) in zip(paths, loaded))
        raise UsageError(f"members take different input sizes ({found})", "ensemble models trained at one size")
    opsets = {next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None) for proto, _ in loaded}
    if len(opsets) > 1:
        raise UsageError(f"members use different ONNX opsets ({sorted(opsets, key=str)})", "export them alike")

    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    member_probs: list[str] = []
    for i, (proto, meta) in enumerate(loaded):
        prefix = f"m{i}/"

        def renamed(name: str, prefix: str = prefix) -> str:
            return name if name in ("", "image") else prefix + name

        for init in proto.graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(init)
            copy.name = renamed(init.name)
            initializers.append(copy)
        for node in proto.graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = prefix + (node.name or node.op_type)
            copy.input[:] = [renamed(n) for n in node.input]
            copy.output[:] = [renamed(n) for n in node.output]
            nodes.append(copy)
        to_origin = prefix + "to_origin"
        initializers.append(numpy_helper.from_array(_origin_matrix(meta["classes"]), to_origin))
        nodes += [
            helper.make_node("Softmax", [prefix + "logits"], [prefix + "probs"], axis=1, name=prefix + "softmax"),
            helper.make_node("MatMul", [prefix + "probs", to_origin], [prefix + "p_origin"], name=prefix + "origin"),
        ]
        member_probs.append(prefix + "p_origin")

    initializers += [
        numpy_helper.from_array(np.array(1.0 / len(paths), dtype=np.float32), "ensemble/weight"),
        numpy_helper.from_array(np.array(_P_FLOOR, dtype=np.float32), "ensemble/floor"),
    ]
    nodes += [
        helper.make_node("Sum", member_probs, ["ensemble/sum"], name="ensemble/sum"),
        helper.make_node("Mul", ["ensemble/sum", "ensemble/weight"], ["ensemble/mean"], name="ensemble/mean"),
        helper.make_node("Max", ["ensemble/mean", "ensemble/floor"], ["ensemble/floored"], name="ensemble/floor"),
        helper.make_node("Log", ["ensemble/floored"], ["logits"], name="ensemble/log"),
    ]
    first = loaded[0][0]
    image = onnx.ValueInfoProto()
    image.CopyFrom(first.graph.input[0])
    graph = helper.make_graph(
        nodes,
        "ensemble",
        inputs=[image],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(ORIGIN_CLASSES)])],
        initializer=initializers,
    )
    proto = helper.make_model(graph, opset_imports=list(first.opset_import), producer_name="fakecifar")
    proto.ir_version = first.ir_version
    if fp16:
        fp16_weights(proto)
    height, width = sizes.pop()
    described = [
        {
            "file": p.name,
            "arch": m["arch"],
            "arch_kwargs": m["arch_kwargs"],
            "classes": m["classes"],
            "train": m["train"],
        }
        for p, (_, m) in zip(paths, loaded)
    ]
    props = {
        "format": ONNX_FORMAT,
        "version": VERSION,
        "arch": ENSEMBLE_ARCH,
        "arch_kwargs": {"members": described, "weights": "float16" if fp16 else "float32"},
        "classes": list(ORIGIN_CLASSES),
        "mean": [0.0, 0.0, 0.0],  # normalization is inside each member's graph
        "std": [1.0, 1.0, 1.0],
        "input_size": [height, width],
        "train": {"ensemble": "mean of the members' P(fake), equal weights"},
    }
    proto.doc_string = f"ensemble of {len(paths)} real/fake models; input float32 RGB in [0,1], NCHW"
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    blob = proto.SerializeToString()
    return write_atomically(Path(out), lambda fh: fh.write(blob))


def fp16_weights(proto: onnx.ModelProto) -> None:
    """In place: every float32 initializer of at least 64 elements becomes a float16 one,
    cast back to float32 where it is used."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < _FP16_MIN_ELEMENTS:
            continue
        name = init.name
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name + "/fp16")
        init.CopyFrom(half)
        casts.append(helper.make_node("Cast", [name + "/fp16"], [name], to=TensorProto.FLOAT, name=name + "/cast"))
    # Casts first: nodes must come in topological order.
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + existing)
