#!/usr/bin/env bash
# Make Fashion-MNIST available: the Debian package where apt can install it, else a download into
# the user cache, else a clear message. Usage: get-data.sh PYTHON [--quiet]
set -u
PY=${1:-python3}
QUIET=${2:-}
DEB_DIR=/usr/share/datasets/fashion-mnist
say() { [ "$QUIET" = "--quiet" ] || echo "$@"; }

if [ -f "$DEB_DIR/train-images-idx3-ubyte.gz" ]; then
  say "Fashion-MNIST: found the Debian package's files in $DEB_DIR"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  say "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"
  if (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
      (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)); then
    say "Fashion-MNIST: installed in $DEB_DIR"
    exit 0
  fi
  say "Fashion-MNIST: apt could not install dataset-fashion-mnist; trying a download"
fi
# The loader searches --data-dir, $MEMFL_DATA, the user cache, the Debian folder, then downloads.
"$PY" - <<'PYEOF'
import sys
from memfl.data import DataError, load_dataset
try:
    ds = load_dataset("fashion-mnist", progress=True)
except DataError as err:
    print(f"Fashion-MNIST is not available: {err}", file=sys.stderr)
    sys.exit(1)
print(f"Fashion-MNIST: {len(ds.train_y)} training images from {ds.source}")
PYEOF
