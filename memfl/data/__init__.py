"""Data for memfl experiments: data sets, client partitions and device profiles.

- :func:`load_dataset` / :func:`make_synthetic` -> :class:`Dataset` (normalised float32 tensors).
- :func:`partition` splits sample indices among clients (``iid``, ``dirichlet:ALPHA``, ``classes:K``).
- :data:`DEVICES`, :func:`assign_budgets` give simulated clients a device class and memory budget.
"""

from memfl.data.datasets import DATASETS, DataError, Dataset, cache_dir, load_dataset, make_synthetic
from memfl.data.devices import (
    BUDGET_FORMS,
    DEVICE_KINDS,
    DEVICE_TABLE_VERSION,
    DEVICES,
    MB,
    DeviceProfile,
    assign_budgets,
    get_device,
    parse_budget_spec,
)
from memfl.data.partition import PARTITION_FORMS, label_histogram, parse_partition, partition

__all__ = [
    "BUDGET_FORMS",
    "DATASETS",
    "DEVICES",
    "DEVICE_KINDS",
    "DEVICE_TABLE_VERSION",
    "MB",
    "PARTITION_FORMS",
    "DataError",
    "Dataset",
    "DeviceProfile",
    "assign_budgets",
    "cache_dir",
    "get_device",
    "label_histogram",
    "load_dataset",
    "make_synthetic",
    "parse_budget_spec",
    "parse_partition",
    "partition",
]
