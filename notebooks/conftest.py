"""nbval settings for executing the chapter notebooks (``make test``).

nbval waits a fixed 5 s for a cell's output messages after the kernel reports the cell done;
on a loaded 2-core CI machine the kernel's output can lag longer, which fails a cell that
succeeded ("Timeout of 5 seconds exceeded waiting for output"). Give it a minute.
"""
import nbval.plugin

_init = nbval.plugin.IPyNbCell.__init__


def _init_with_patient_output(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.output_timeout = 60


nbval.plugin.IPyNbCell.__init__ = _init_with_patient_output
