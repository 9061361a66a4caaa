"""The offline image tools behind ``vhd convert``, ``commit``, ``compact`` and ``resize``.

They plan with ``vhdfs.image`` (the data path of ``commit``, the structural plans of
``reshape``) and execute: guest data through ``vhdfs.disk`` (the mount's own write-back
layer), structural plans with ``apply``. None of them decides an order of writes itself.
"""
