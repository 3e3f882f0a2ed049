"""The random example input that :func:`~memfl.memory.estimate` and :func:`~memfl.memory.measure`
train on.

By default a batch is ``torch.randn`` in the model's floating dtype (images, feature vectors).
Models whose input is not a float tensor need another one: token ids for an embedding, for
instance. :func:`input_spec` decides, in this order:

1. an explicit ``example``, a tensor (e.g. a few rows of the training inputs): floating ->
   standard normal of its dtype; integer -> uniform ids in ``[example.min(), example.max()]`` of
   its dtype; bool -> random booleans. Or an :class:`InputSpec` carried by the model as
   ``memfl_input_spec`` (on itself or a submodule; :func:`memfl.run` tags the user's models so);
2. a model whose first parameterised module is an :class:`torch.nn.Embedding` /
   :class:`torch.nn.EmbeddingBag` -> int64 ids in ``[0, num_embeddings)``;
3. otherwise the default (standard normal in the model's floating dtype), unchanged for every
   shipped model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["InputSpec", "input_spec", "random_input"]


@dataclass(frozen=True)
class InputSpec:
    """How to draw a random input batch.

    kind:  ``"normal"`` (standard normal), ``"int"`` (uniform integers in ``[low, high)``) or
           ``"bool"``.
    dtype: the tensor dtype; None for ``"normal"`` means the model's floating dtype.
    """

    kind: str = "normal"
    dtype: torch.dtype | None = None
    low: int = 0
    high: int = 1

    @classmethod
    def from_example(cls, example: torch.Tensor) -> "InputSpec":
        example = torch.as_tensor(example)
        if example.dtype == torch.bool:
            return cls("bool", torch.bool)
        if example.is_floating_point() or example.is_complex():
            return cls("normal", example.dtype)
        if example.numel() == 0:
            raise ValueError("example input is empty: cannot read the range of its integer values")
        return cls("int", example.dtype, int(example.min()), int(example.max()) + 1)


def _first_parameterised(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            return m
    return None


def input_spec(model: nn.Module | None, example: "torch.Tensor | InputSpec | None" = None) -> InputSpec:
    """The :class:`InputSpec` for ``model`` (see the module docstring for the rules)."""
    if isinstance(example, InputSpec):
        return example
    if example is not None:
        return InputSpec.from_example(example)
    if model is not None:
        for m in model.modules():
            tagged = getattr(m, "memfl_input_spec", None)
            if isinstance(tagged, InputSpec):
                return tagged
    first = _first_parameterised(model) if model is not None else None
    if isinstance(first, (nn.Embedding, nn.EmbeddingBag)):
        return InputSpec("int", torch.long, 0, int(first.num_embeddings))
    return InputSpec()


def random_input(
    shape: tuple[int, ...],
    spec: InputSpec,
    float_dtype: torch.dtype | None = None,
    device: "str | torch.device | None" = None,
) -> torch.Tensor:
    """A random batch of ``shape`` drawn as ``spec`` says (``float_dtype``: the model's dtype)."""
    if spec.kind == "int":
        return torch.randint(spec.low, spec.high, tuple(shape), dtype=spec.dtype, device=device)
    if spec.kind == "bool":
        return torch.randint(0, 2, tuple(shape), device=device).bool()
    dtype = spec.dtype or float_dtype
    if dtype is None:
        return torch.randn(*shape, device=device)
    return torch.randn(*shape, dtype=dtype, device=device)
