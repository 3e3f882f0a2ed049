"""Instructions and results as Flower records, and back: tensors plus plain values, never pickle.

One train message carries a :class:`~flwr.app.RecordDict` with

- ``"params"``: an :class:`~flwr.app.ArrayRecord` with the tensors by state-dict name (numpy
  ``.npy`` bytes, which Flower loads with ``allow_pickle=False``);
- ``"meta"``: a :class:`~flwr.app.ConfigRecord` whose one field ``"json"`` holds
  ``Instruction.meta_json()`` / ``Result.meta_json()`` as JSON text (plans and hyper-parameters
  are nested, which ConfigRecord values cannot be);
- for results also ``"metrics"``: a :class:`~flwr.app.MetricRecord` with the flat numbers
  (``num-examples``, ``loss``, ``compute-seconds`` ...) so that Flower's own tools can read them.

Tensors whose dtype numpy lacks (``bfloat16``) travel as their raw bits (``int16`` view) and
are restored from the dtype noted in the meta JSON.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from memfl.core.protocol import Instruction, Result

PARAMS = "params"
META = "meta"
METRICS = "metrics"
NODE = "node"

#: torch dtypes numpy cannot hold -> the same-width integer dtype their bits travel as
_BIT_VIEWS = {torch.bfloat16: torch.int16}
_DTYPES = {str(t): t for t in _BIT_VIEWS}


def tensors_to_record(tensors: dict[str, torch.Tensor]) -> tuple[ArrayRecord, dict[str, str]]:
    """An ArrayRecord of ``tensors`` (in order) and ``{name: torch dtype}`` for bit-cast ones."""
    record = ArrayRecord()
    cast: dict[str, str] = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if t.dtype in _BIT_VIEWS:
            cast[name] = str(t.dtype)
            t = t.view(_BIT_VIEWS[t.dtype])
        record[name] = Array.from_numpy_ndarray(t.contiguous().numpy())
    return record, cast


def record_to_tensors(record: ArrayRecord, cast: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`tensors_to_record`."""
    out: dict[str, torch.Tensor] = {}
    for name, arr in record.items():
        a = arr.numpy()
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
        if cast and name in cast:
            t = t.view(_DTYPES[cast[name]])
        out[name] = t
    return out


def _meta_record(meta: dict[str, Any]) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps(meta, sort_keys=True)})


def _meta(content: RecordDict) -> dict[str, Any]:
    try:
        return json.loads(content[META]["json"])  # type: ignore[index]
    except KeyError:
        raise ValueError(
            f"message content has no {META!r} ConfigRecord with a 'json' field; "
            "was it sent by a memfl ServerApp/ClientApp of the same version?"
        ) from None


def instruction_to_content(ins: Instruction) -> RecordDict:
    """A fresh RecordDict for one train message (never share one between messages)."""
    tensors, cast = tensors_to_record(ins.params)
    meta = ins.meta_json()
    if cast:
        meta["tensor_dtypes"] = cast
    return RecordDict({PARAMS: tensors, META: _meta_record(meta)})


def content_to_instruction(content: RecordDict) -> Instruction:
    meta = _meta(content)
    cast = meta.pop("tensor_dtypes", None)
    return Instruction.from_parts(record_to_tensors(content[PARAMS], cast), meta)  # type: ignore[arg-type]


def result_to_content(res: Result, extra: dict[str, Any] | None = None) -> RecordDict:
    """The reply content for one result; ``extra`` (JSON-able) rides along as ``meta['node']``."""
    tensors, cast = tensors_to_record(res.params)
    meta = res.meta_json()
    if cast:
        meta["tensor_dtypes"] = cast
    if extra:
        meta[NODE] = extra
    metrics = MetricRecord(
        {
            "num-examples": int(res.num_samples),
            "loss": float(res.loss),
            "compute-seconds": float(res.compute_seconds),
            "steps": int(res.steps),
        }
    )
    return RecordDict({PARAMS: tensors, META: _meta_record(meta), METRICS: metrics})


def content_to_result(content: RecordDict) -> tuple[Result, dict[str, Any]]:
    """The :class:`Result` and the ``extra`` dict sent with it (empty if none)."""
    meta = _meta(content)
    cast = meta.pop("tensor_dtypes", None)
    extra = meta.pop(NODE, None) or {}
    return Result.from_parts(record_to_tensors(content[PARAMS], cast), meta), extra  # type: ignore[arg-type]


def info_to_content(info: dict[str, Any]) -> RecordDict:
    """A node's self-description (the reply to the server's query)."""
    return RecordDict({NODE: _meta_record(info)})


def content_to_info(content: RecordDict) -> dict[str, Any]:
    return json.loads(content[NODE]["json"])  # type: ignore[index]


def json_record(data: dict[str, Any]) -> ConfigRecord:
    """A ConfigRecord holding ``data`` as JSON text in its ``json`` field."""
    return _meta_record(data)
