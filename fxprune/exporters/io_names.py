"""The names an exported ONNX graph's outputs get: the ones the model's forward returns them
under, so serving code binds by a name that says what it is.

torch.onnx names each graph output after the node that computed it (``linear_28``,
``layer_norm_8``, ``tanh``), which changes with every edit of the model. Here an output is named
by where it sits in what ``forward`` returns (the exported program's output tree):

- a mapping (a dict, a Hugging Face ``ModelOutput``) or a named tuple: its keys, nested ones
  joined with dots (``logits``, ``last_hidden_state``, ``pooler_output``,
  ``past_key_values.0.1``);
- anything else (one tensor, a tuple or list): ``output_0``, ``output_1``, ... in order.

Where the tree does not match the graph's outputs one to one (a non-tensor leaf, duplicate
names), every output is ``output_<i>``. Inputs already carry the forward's parameter names
(``input_ids``, ``attention_mask``, ``x``): torch.export names its placeholders after them.
"""

from __future__ import annotations

from torch.utils import _pytree as pytree


class _Leaf:
    """A stand-in for one output tensor, to rebuild the output tree without running it."""


def output_names(spec, count: int) -> list[str]:
    """The names of ``count`` graph outputs whose tree is the pytree ``spec`` (see the module
    docstring); ``spec`` may be None (unknown)."""
    fallback = [f"output_{i}" for i in range(count)]
    if spec is None or spec.num_leaves != count or count == 0:
        return fallback
    try:
        tree = pytree.tree_unflatten([_Leaf() for _ in range(count)], spec)
        paths = [path for path, _ in pytree.tree_flatten_with_path(tree)[0]]
    except Exception:  # noqa: BLE001 - an output type that cannot be rebuilt: numbered
        return fallback
    named = (pytree.MappingKey, pytree.GetAttrKey)
    if len(paths) != count or not all(p and isinstance(p[0], named) for p in paths):
        return fallback
    names = [".".join(_key(k) for k in p) for p in paths]
    return names if len(set(names)) == count else fallback


def _key(k) -> str:
    if isinstance(k, pytree.MappingKey):
        return str(k.key)
    if isinstance(k, pytree.SequenceKey):
        return str(k.idx)
    if isinstance(k, pytree.GetAttrKey):
        return k.name
    return str(k)


def name_outputs(prog) -> list[str]:
    """Rename the outputs of ``prog`` (a ``torch.onnx.ONNXProgram``, before it is saved) by
    :func:`output_names`; returns the output names. An output that is a graph input or an
    initializer, or repeats another output, keeps its name; an inner value that holds a wanted
    name is renamed out of the way."""
    from onnx_ir import traversal  # torch.onnx's IR: installed with the dynamo exporter

    graph = prog.model.graph
    ep = getattr(prog, "exported_program", None)
    spec = ep.call_spec.out_spec if ep is not None and ep.call_spec is not None else None
    outs = list(graph.outputs)
    wanted = output_names(spec, len(outs))
    movable = [
        k
        for k, v in enumerate(outs)
        if not (v.is_graph_input() or v.is_initializer()) and outs.index(v) == k
    ]
    for k in movable:  # out of each other's way first: two outputs may swap names
        outs[k].name = f"fxprune.output.{k}"
    fixed = {v.name for v in graph.inputs} | set(graph.initializers)
    fixed |= {v.name for k, v in enumerate(outs) if k not in movable}
    inner = {
        v.name: v
        for node in traversal.RecursiveGraphIterator(graph)
        for v in node.outputs
        if v.name and not v.is_graph_output()
    }
    for k in movable:
        name = wanted[k]
        if name in fixed:  # an input's name: the output says it is one
            name = _free(f"{name}_output", fixed, inner)
        elif name in inner:  # an inner value's: move that one
            other = inner.pop(name)
            other.name = _free(name, fixed, inner, wanted)
            inner[other.name] = other
        outs[k].name = name
        fixed.add(name)
    return [v.name for v in graph.outputs]


def _free(base: str, *taken) -> str:
    """``base``, else ``base_1``, ``base_2``, ...: the first that none of ``taken`` holds."""
    name, i = base, 0
    while any(name in t for t in taken):
        i += 1
        name = f"{base}_{i}"
    return name
