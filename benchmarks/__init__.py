"""safeckpt's benchmark suite: ``python -m benchmarks --help``.

Compares safeckpt's save, full load and lazy open against ``torch.save`` /
``torch.load`` and ``safetensors`` on the same tensors, with the raw disk write,
read and memcpy of the same bytes as the physical limit. Each measurement runs
in its own process; see :mod:`benchmarks.run` for the method and
:mod:`benchmarks.plan` for what is measured. Timings live only here: the tests
never assert on wall-clock time.
"""
