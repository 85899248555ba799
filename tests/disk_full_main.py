"""`python -m jaxlm.main` on a disk that fills up during one checkpoint save.

    FULL_AT_STEP=4 FULL_AT_ITEM=config python -m tests.disk_full_main --config=... --workdir=...

Every file written (through etils.epath, as orbax's JSON items, grain's data position and
orbax's own metadata are) into the temporary directory of checkpoint step FULL_AT_STEP whose
path contains FULL_AT_ITEM fails with OSError(ENOSPC), as write() on a full disk does. The
data position is written while `save` runs; the config item in orbax's background commit, so
the two items exercise both ways a failed save reaches the trainer.
"""

import errno
import os
import runpy
import sys

from etils.epath import abstract_path

_write_text = abstract_path.Path.write_text


def _full_disk_write_text(self, *args, **kwargs):
    path = os.fspath(self)
    if (f"/{os.environ['FULL_AT_STEP']}.orbax-checkpoint-tmp" in path
            and os.environ.get("FULL_AT_ITEM", "") in path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return _write_text(self, *args, **kwargs)


if __name__ == "__main__":
    abstract_path.Path.write_text = _full_disk_write_text
    sys.argv = ["jaxlm.main", *sys.argv[1:]]
    runpy.run_module("jaxlm.main", run_name="__main__", alter_sys=True)
