#!/usr/bin/env python3
"""Stage 40: CSR user x item matrices (explicit float32 ratings and a binary implicit view) for train / valid / test in one shared id space, plus evaluation candidates for leave-one-out / NCF splits. Reads DATA_DIR/30_split_train_test, writes DATA_DIR/40_make_sparse_matrix."""
import os
import sys

# Arrow's default pool (mimalloc) keeps freed buffers, such as the columns of a part once
# its matrices are saved, mapped in the process; the system allocator returns them to the
# OS at once (peak RSS at Netflix scale). Set before pyarrow is first used.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from recpipe.cli import run_main  # noqa: E402
from recpipe.matrix import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main))
