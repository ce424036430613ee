#!/usr/bin/env python3
"""Stage 30: split the ratings into train / valid / test by a seeded, reproducible strategy (random, user-random, temporal-global, temporal-user, loo with sampled negatives, probe, kfold, ncf). Reads DATA_DIR/20_make_ids, writes DATA_DIR/30_split_train_test."""
import os
import sys

# Arrow's default pool (mimalloc) keeps freed buffers, such as the input columns this stage
# drops as it goes, mapped in the process; the system allocator returns them to the OS at
# once (peak RSS at Netflix scale). Set before pyarrow is first used.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from recpipe.cli import run_main  # noqa: E402
from recpipe.split import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main))
