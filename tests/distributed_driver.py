"""Run under ``mpirun -n K`` (or alone) by tests/test_distributed.py: trains a small MLP on
seeded synthetic data with the library API and writes the final weights as .npz.

    python tests/distributed_driver.py OUT BACKEND DTYPE FLAT(0|1) [RUN_DIR|-] [TRAIN_ROWS]

With K processes each rank trains through ``Trainer(comm=...)`` and rank r gets its own
``RUN_DIR-r`` (only rank 0's may appear); alone, the same run on one process.
"""
import sys

import numpy as np

from nnx.backends import get_backend
from nnx.data import Split
from nnx.distributed import create_communicator, detect
from nnx.model import mlp
from nnx.optim import make_optimizer
from nnx.schedules import make_schedule
from nnx.trainer import Trainer

out, backend_name, dtype, flat = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
run_dir = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "-" else None
rows = int(sys.argv[6]) if len(sys.argv) > 6 else 405  # training rows (the rest validate)
backend = get_backend(backend_name)
comm = create_communicator(backend) if detect() else None
rank = comm.rank if comm else 0

rng = np.random.default_rng(0)
n, d, classes = 500, 20, 4  # 405 training rows, batch 48: 8 full batches, a last one of 21
x = rng.normal(size=(n, d))
y = (x[:, :classes].argmax(axis=1) + (rng.random(n) < 0.1)) % classes
split = lambda a, b: Split(backend.from_numpy(x[a:b], dtype=backend.dtype(dtype)),
                           backend.from_numpy(y[a:b].astype(np.int64)))
model = mlp([d, 16, classes], backend=backend, dtype=dtype, seed=3, flat=flat)
opt = make_optimizer("adam", model.named_parameters(), 1e-2, weight_decay=1e-4, clip_norm=5.0)
trainer = Trainer(model, opt, make_schedule("cosine", 1e-2, 2, -(-rows // 48)), batch_size=48,
                  epochs=2, seed=7, progress=False, log=lambda *a: None, comm=comm,
                  run_dir=f"{run_dir}-{rank}" if run_dir else None)
history = trainer.fit(split(0, rows), split(rows, 500))
if rank == 0:
    np.savez(out, **model.state_dict(),
             metrics=np.asarray([[r["train_loss"], r["train_acc"], r["val_loss"], r["val_acc"]]
                                 for r in history]))
