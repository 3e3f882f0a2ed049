"""Cut a model into T sequential blocks (SPEC 2.1).

A :class:`Partition` is plain bookkeeping over an *unchanged* model: an ordered list of groups of
unit names (module paths, so the state-dict keys stay those of the model) plus the name of the
head. Running every unit of every group in order, then the head, is the model's forward.

- A memfl :class:`~memfl.models.BlockModel` cut into ``len(model.blocks)`` blocks (4 for every
  shipped model) uses its own blocks: the ResNet stages with the stem joined to block 1, the VGG
  stage groups, the CNN's conv blocks, the ViT's groups of three layers.
- Any other T, or ``mode="balanced"``, cuts the finer :func:`~memfl.models.units` list into T
  contiguous groups so that the largest predicted *stage* peak is as small as it can be (exact
  dynamic programming over a per-unit profile: saved activations counted with
  ``saved_tensors_hooks`` on a 2-sample forward, parameter/gradient/momentum bytes, the output
  module and the Training Harmonizer's co-trained layer; see :func:`memory_balanced_starts`).
  Cuts fall only before units with parameters, so every block has something to train.
- ``boundaries`` (unit indices or unit names where blocks 2..T start) cut exactly where asked.
- A plain ``nn.Module`` is cut from its ordered top-level children: all but the last are units,
  the last is the head (``head=`` names another one). Its forward must be the children in order
  (checked on a probe batch drawn like the memory estimator's, :func:`example_input`: token ids
  when its first layer is an ``nn.Embedding``, floats otherwise). A norm layer right after a conv/linear child is never
  cut from it. Works for an MLP on (N, F), an embedding model on (N, T) int64 tokens whose pooling
  is a child module, a small CNN on non-square images.

Every way raises :class:`PartitionError` with a clear message when the model cannot be cut as
asked (fewer units than blocks, a boundary that is not a unit, a non-sequential model, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from memfl.memory.inputs import input_spec, random_input
from memfl.methods.scalefl.output import OutputModule, ProjectionHead, exit_channels
from memfl.models.base import BlockModel, last_layer_names, units

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


class PartitionError(ValueError):
    """The model cannot be cut into blocks as asked."""


@dataclass(frozen=True)
class Partition:
    """groups[i]: the ordered unit names (module paths) of block i+1; head: the head's name."""

    groups: tuple[tuple[str, ...], ...]
    head: str

    @property
    def blocks(self) -> int:
        return len(self.groups)

    def unit_names(self) -> list[str]:
        return [u for g in self.groups for u in g]

    def to_json(self) -> dict:
        return {"groups": [list(g) for g in self.groups], "head": self.head}

    @classmethod
    def from_json(cls, data: dict) -> "Partition":
        return cls(groups=tuple(tuple(g) for g in data["groups"]), head=data["head"])

    def block_of(self, key: str) -> int | None:
        """1-based block a state-dict key belongs to (None for the head / anything else)."""
        for i, g in enumerate(self.groups):
            for u in g:
                if key == u or key.startswith(u + "."):
                    return i + 1
        return None

    def boundary_layers(self, model: nn.Module, block: int) -> list[str]:
        """Module names of the last layer of block ``block`` (1-based): the layer the Training
        Harmonizer co-trains with block ``block + 1``. The last weighted unit of the block is asked
        with :func:`~memfl.models.last_layer_names` (ResNet: conv2 + bn2 of the last residual unit,
        CNN/VGG: the last conv + BN, ViT: the last transformer layer; a user's flat ``nn.Sequential``:
        its last conv/linear unit and the norm unit right after it, an MLP's last ``nn.Linear``, an
        ``nn.Embedding``). Empty when the block has no parameters (the harmonizer is then off)."""
        group = self.groups[block - 1]
        for i in range(len(group) - 1, -1, -1):
            name = group[i]
            mod = model.get_submodule(name)
            found = last_layer_names(mod, name)
            if found:
                # a user's flat nn.Sequential: a norm unit right after a conv/linear unit is one layer
                if isinstance(mod, _NORMS) and i > 0 and isinstance(model.get_submodule(group[i - 1]), _WEIGHTED):
                    return [group[i - 1], name]
                return found
        return []


def _sequential_children(model: nn.Module, head: str | None) -> tuple[list[str], str]:
    names = [n for n, _ in model.named_children()]
    if len(names) < 2:
        raise PartitionError(
            f"{type(model).__name__} has {len(names)} top-level children; a model "
            "cut from its children needs at least one unit and a head"
        )
    head = head or names[-1]
    if head not in names:
        raise PartitionError(
            f"head {head!r} is not a top-level child of {type(model).__name__}; children: {', '.join(names)}"
        )
    if head != names[-1]:
        raise PartitionError(f"head {head!r} must be the last top-level child (children: {', '.join(names)})")
    return names[:-1], head


def _unit_list(model: nn.Module, head: str | None) -> tuple[list[str], str]:
    if isinstance(model, BlockModel) or (
        hasattr(model, "blocks") and hasattr(model, "head") and isinstance(model.blocks, nn.ModuleList)
    ):
        return [n for n, _ in units(model)], "head"  # type: ignore[arg-type]
    return _sequential_children(model, head)


def example_input(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch: int,
    *,
    zeros: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """A probe batch ``(batch, *input_shape)`` for ``model``, drawn as the memory estimator draws
    its input (:func:`memfl.memory.inputs.input_spec`: token ids in range for a model whose first
    layer is an ``nn.Embedding`` or that carries a ``memfl_input_spec``; else ``torch.randn`` of
    ``dtype``). ``zeros``: all zeros of that dtype instead (a deterministic shape probe)."""
    spec = input_spec(model)
    if zeros:
        return torch.zeros(batch, *input_shape, dtype=spec.dtype or dtype, device=device)
    return random_input((batch, *input_shape), spec, float_dtype=dtype, device=device)


def _saved_bytes(fn, x: torch.Tensor, exclude: set[int]) -> int:
    """Bytes autograd saves for backward while ``fn(x)`` runs (storages counted once; parameters and
    buffers in ``exclude`` are not activations)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key = t.untyped_storage().data_ptr()
            if key not in exclude:
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
        # never backpropagated: keep a detached alias, so an op that saves its own output does not
        # tie the graph into a reference cycle that outlives this call
        return t.detach()

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def memory_balanced_starts(
    model: nn.Module,
    names: list[str],
    head: str,
    blocks: int,
    input_shape: tuple[int, ...],
    batch_size: int,
    atoms: list[int],
    exit_width: str = "light",
) -> list[int]:
    """Block start indices (into ``names``) minimising the largest predicted *stage* peak.

    Every candidate stage (units i..j-1 trained, the harmonized last unit of the block before it --
    recomputed, so it keeps its input --, the output module after it) is run once on a 2-sample
    batch as the stage engine runs it, counting the bytes autograd saves; its cost at ``batch_size`` (SGD with
    momentum) = parameters
    held (units 0..j-1 and the output module or head) + momentum of what trains + the larger of
    its gradients and the saved activations (the backward frees the one as the other appears) +
    the backward's in-flight buffers (three of the stage's largest activation or weight gradient),
    activations scaled to the batch -- the shape of :func:`memfl.memory.estimate`'s model. Exact dynamic
    programming then picks the cut whose
    most expensive stage is cheapest. Cuts fall only on ``atoms`` (units with parameters)."""
    n = len(names)
    mods = [model.get_submodule(u) for u in names]
    head_mod = model.get_submodule(head)
    all_params = list(model.parameters())
    flags = [(q, q.requires_grad) for q in all_params]
    was = model.training
    p0 = all_params[0] if all_params else None
    x = example_input(
        model, input_shape, 2, dtype=p0.dtype if p0 is not None else None, device=p0.device if p0 is not None else None
    )
    inputs, shapes = [], []
    try:
        model.eval()
        with torch.no_grad():
            num_classes = int(model(x).shape[-1])
            h = x
            for m in mods:
                inputs.append(h)
                h = m(h)
                shapes.append(tuple(h.shape[1:]))
        model.train()
        ends = atoms[1:] + [n]
        exits = {
            e: OutputModule(shapes[e - 1], exit_channels(shapes, e - 1, num_classes, exit_width), num_classes)
            for e in ends
            if e < n
        }
        exit_par = {e: _nbytes(m) + _nbytes(ProjectionHead(m.width)) for e, m in exits.items()}
        prefix = [0]
        for m in mods:
            prefix.append(prefix[-1] + _nbytes(m))
        exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        for m in exits.values():
            exclude |= {t.untyped_storage().data_ptr() for t in m.parameters()}

        def stage_cost(i: int, j: int) -> float:
            out = exits.get(j, head_mod)
            out_par = exit_par.get(j, _nbytes(head_mod))
            w = max(a for a in atoms if a < i) if i > 0 else i  # the harmonized unit of the block before
            boundary = last_layer_names(mods[w], names[w]) if i > 0 else []
            b_params = [q for b in boundary for q in model.get_submodule(b).parameters()]
            for q in all_params:
                q.requires_grad_(False)
            for q in [*b_params, *(q for m in mods[i:j] for q in m.parameters())]:
                q.requires_grad_(True)

            def run(h: torch.Tensor) -> torch.Tensor:
                h = h.detach().clone()
                with torch.no_grad():  # the harmonized tail is recomputed: it keeps its input only
                    for m in mods[w:i]:
                        h = m(h)
                for m in mods[i:j]:
                    h = m(h)
                return out(h)

            saved = _saved_bytes(run, inputs[w], exclude) / x.shape[0]
            if i > 0:
                saved += inputs[w][0].numel() * inputs[w].element_size()
            trained = prefix[j] - prefix[i] + out_par + sum(q.numel() * q.element_size() for q in b_params)
            # the backward's in-flight buffers: about three of the stage's largest activation
            # gradient, or of its largest weight gradient
            largest_act = max(inputs[u][0].numel() * inputs[u].element_size() for u in range(i, j))
            largest_par = max((q.numel() * q.element_size() for m in mods[i:j] for q in m.parameters()), default=0)
            in_flight = 3 * max(batch_size * largest_act, largest_par)
            # held + momentum + (activations, freed while the gradients appear) + in flight
            return prefix[j] + out_par + trained + max(batch_size * saved, trained) + in_flight

        edges = atoms + [n]
        k_atoms = len(atoms)
        cost = {(a, b): stage_cost(edges[a], edges[b]) for a in range(k_atoms) for b in range(a + 1, k_atoms + 1)}
    finally:
        for q, flag in flags:
            q.requires_grad_(flag)
        model.train(was)

    inf = float("inf")
    best = [[inf] * (k_atoms + 1) for _ in range(blocks + 1)]
    arg = [[0] * (k_atoms + 1) for _ in range(blocks + 1)]
    best[0][0] = 0.0
    for k in range(1, blocks + 1):
        for b in range(k, k_atoms + 1):
            for a in range(k - 1, b):
                v = max(best[k - 1][a], cost[(a, b)])
                if v < best[k][b] - 1e-6:
                    best[k][b], arg[k][b] = v, a
    cuts, b = [], k_atoms
    for k in range(blocks, 0, -1):
        b = arg[k][b]
        cuts.append(b)
    return [edges[a] for a in sorted(cuts)[1:]]


def partition_model(
    model: nn.Module,
    blocks: int = 4,
    *,
    mode: str = "default",
    boundaries: Sequence[int | str] | None = None,
    head: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    batch_size: int = 32,
    exit_width: str = "light",
) -> Partition:
    """Cut ``model`` into ``blocks`` blocks (see the module docstring).

    mode:        ``"default"`` (a BlockModel's own blocks when their number matches, else balanced)
                 or ``"balanced"`` (always minimise the largest stage peak over the finer units).
    boundaries:  unit indices (0-based, into the unit list) or unit names where blocks 2..T start;
                 overrides ``mode``.
    head:        for a plain ``nn.Module``: the name of the child acting as the head (must be last).
    input_shape: one sample's shape, needed to balance a model that does not record it in ``arch``.
    batch_size:  the training batch the memory balance is computed for (``balanced`` only);
                 ``exit_width``: the output modules' width it assumes (see
                 :func:`memfl.methods.scalefl.output.exit_channels`).
    """
    if blocks < 1:
        raise PartitionError(f"blocks must be >= 1, got {blocks}")
    if mode not in ("default", "balanced"):
        raise PartitionError(f"partition mode {mode!r}: expected 'default' or 'balanced'")
    names, head_name = _unit_list(model, head)
    if blocks > len(names):
        raise PartitionError(
            f"{type(model).__name__} has only {len(names)} sequential units "
            f"({', '.join(names)}); cannot cut it into {blocks} blocks"
        )

    if boundaries is not None:
        starts = []
        for b in boundaries:
            if isinstance(b, str):
                if b not in names:
                    raise PartitionError(f"boundary {b!r} is not a unit; units: {', '.join(names)}")
                starts.append(names.index(b))
            else:
                starts.append(int(b))
        if len(starts) != blocks - 1:
            raise PartitionError(f"{blocks} blocks need {blocks - 1} boundaries, got {len(starts)}")
        if starts != sorted(set(starts)) or (starts and (starts[0] < 1 or starts[-1] >= len(names))):
            raise PartitionError(
                f"boundaries {list(boundaries)} must be strictly increasing unit indices in 1..{len(names) - 1}"
            )
    elif (
        mode == "default" and isinstance(getattr(model, "blocks", None), nn.ModuleList) and len(model.blocks) == blocks
    ):  # type: ignore[arg-type]
        return Partition(groups=tuple(_block_units(names, i) for i in range(blocks)), head=head_name)
    else:
        shape = input_shape
        arch = getattr(model, "arch", {}) or {}
        if shape is None and {"in_channels", "image_size"} <= arch.keys():
            shape = (arch["in_channels"], arch["image_size"], arch["image_size"])
        if shape is None:
            raise PartitionError("balancing memory needs input_shape (one sample's shape)")
        # atoms: a unit with parameters plus the parameter-free units after it (pooling), so that
        # every block has something to train; a norm layer right after a conv/linear unit (a
        # user's flat nn.Sequential) stays with it
        atoms: list[int] = []
        for i, name in enumerate(names):
            mod = model.get_submodule(name)
            if i == 0 or (
                any(True for _ in mod.parameters())
                and not (isinstance(mod, _NORMS) and isinstance(model.get_submodule(names[i - 1]), _WEIGHTED))
            ):
                atoms.append(i)
        if blocks > len(atoms):
            raise PartitionError(
                f"{type(model).__name__} has only {len(atoms)} units with parameters (a norm "
                f"layer counts with the conv/linear before it); cannot cut it into {blocks} blocks"
            )
        try:
            starts = memory_balanced_starts(
                model, names, head_name, blocks, tuple(shape), batch_size, atoms, exit_width
            )
        except PartitionError:
            raise
        except Exception as err:  # noqa: BLE001 - a non-sequential model, wrong shape, ...
            raise PartitionError(
                f"cannot run the units of {type(model).__name__} in order on input "
                f"{tuple(shape)} ({type(err).__name__}: {err}); give explicit "
                "boundaries or a model whose forward is its children in order"
            ) from None
    edges = [0, *starts, len(names)]
    groups = tuple(tuple(names[edges[i] : edges[i + 1]]) for i in range(blocks))
    return Partition(groups=groups, head=head_name)


def _block_units(names: list[str], i: int) -> tuple[str, ...]:
    prefix = f"blocks.{i}"
    return tuple(n for n in names if n == prefix or n.startswith(prefix + "."))


def check_sequential(model: nn.Module, part: Partition, x: torch.Tensor, atol: float = 1e-5) -> None:
    """Raise :class:`PartitionError` unless running the partition's units then the head on ``x``
    reproduces ``model(x)`` (eval mode)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x)
            h = x
            for name in part.unit_names():
                h = model.get_submodule(name)(h)
            out = model.get_submodule(part.head)(h)
    except Exception as err:  # noqa: BLE001
        raise PartitionError(f"running the units in order fails: {type(err).__name__}: {err}") from None
    finally:
        model.train(was)
    if out.shape != ref.shape or not torch.allclose(out, ref, atol=atol, rtol=1e-4):
        raise PartitionError(
            f"{type(model).__name__}'s forward is not its units in order; give a model "
            "whose forward runs its children in sequence, or wrap it in a BlockModel"
        )
