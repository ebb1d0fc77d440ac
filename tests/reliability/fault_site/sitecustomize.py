"""Fault injection in training processes that a test does not start itself (e.g. runs the web UI launches).

A test puts this folder on the child's PYTHONPATH and sets FLUXLORA_TEST_FAULTS to a fault spec
(`tests/reliability/faults.py`, e.g. `step_delay=1.0`). Python imports `sitecustomize` at start-up; in a process whose
command line trains (`fluxlora.cli train`, `fluxlora train`, `flux_train_network.py`) this installs the spec's hooks:
the write hook in `fluxlora.files` and, through the trainer's own `callbacks` / `loss_hook` arguments, the step and
loss hooks. Nothing of this is in the package; other processes are left alone.
"""

import os
import sys

_SPEC = os.environ.get("FLUXLORA_TEST_FAULTS")
_TRAINS = any(a == "train" for a in sys.argv[1:3]) or any(a.endswith("flux_train_network.py") for a in sys.argv[:1])

if _SPEC and _TRAINS:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/reliability: faults.py
    import faults as _faults  # noqa: E402

    import fluxlora.files as _files  # noqa: E402
    import fluxlora.training.trainer as _trainer  # noqa: E402

    _hooks = _faults.Faults(_SPEC)
    _files.WRITE_HOOKS.append(_hooks.write)
    _init = _trainer.Trainer.__init__

    def _with_faults(self, run, callbacks=(), loss_hook=None):
        _init(self, run, (*callbacks, _hooks.step), loss_hook or _hooks.loss)

    _trainer.Trainer.__init__ = _with_faults
