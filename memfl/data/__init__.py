"""Data for memfl experiments: data sets, client partitions and device profiles.

- :func:`load_dataset` / :func:`make_synthetic` -> :class:`Dataset` (normalised float32 tensors).
- :func:`partition` splits sample indices among clients (``iid``, ``dirichlet:ALPHA``, ``classes:K``).
- :func:`as_dataset` / :func:`load_user_dataset` turn user data (any input shape) into a :class:`Dataset`.
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
from memfl.data.user import as_dataset, import_object, is_import_path, load_user_dataset

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
    "as_dataset",
    "assign_budgets",
    "cache_dir",
    "get_device",
    "import_object",
    "is_import_path",
    "label_histogram",
    "load_dataset",
    "load_user_dataset",
    "make_synthetic",
    "parse_budget_spec",
    "parse_partition",
    "partition",
]
