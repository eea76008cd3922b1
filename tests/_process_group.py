"""How the multi-process test scripts end each rank (``tests/optim/_ddp_script.py``,
``_model_parallel_script.py``, the FSDP2 scripts, ``tests/meta/_meta_ddp_script.py``).

The scripts run as ``python tests/<dir>/_..._script.py``; they put this file's folder on ``sys.path``
and import it by name.
"""

from __future__ import annotations

import os
import sys

import torch


def tear_down() -> None:
    """Leave the process group with the other ranks and end the process at once, skipping the
    interpreter's teardown. Call it after the rank's result is on disk.

    Why not return: gloo's worker threads can still be releasing a finished collective's tensors when
    the interpreter finalizes; releasing a tensor that has a Python object then takes the GIL, which
    ends the thread mid-destructor, and the rank dies of ``terminate called without an active
    exception`` (SIGABRT) after its work is done (pytorch/pytorch#179291: about 1 run in 10 of the
    FSDP2 CPU phases script on a loaded 2-core machine, with a C++ backtrace ending in
    ``ProcessGroupGloo::runLoop`` -> ``TensorImpl::decref_pyobject`` -> ``PyEval_AcquireThread``).
    Destroying the process group first is not enough: the Lightning model-parallel script, which did,
    still failed one CI run this way. A single-process run (no process group) returns
    normally.
    """
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()  # no rank leaves (rank 0 hosts the store) while another still talks to it
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
