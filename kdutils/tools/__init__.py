"""Tools that measure the machine, outside the core a reader imports: the throughput benchmark
(:mod:`~kdutils.tools.bench`), the CPU setting chooser (:mod:`~kdutils.tools.chooser`, passed to
:class:`kdutils.speed.Speed` as ``chooser``) and the scale-out launcher
(:mod:`~kdutils.tools.scale_out`). The core (``kdutils/*.py``) imports nothing from here.
"""
