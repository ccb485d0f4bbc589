"""fssl_covid: federated semi-supervised COVID-19 lesion segmentation in chest CT (after Yang et al., MedIA 2021).

The learner library (``config``, ``data``, ``networks``, ``ssl``, ``trainer``, ``inference``, ``synthetic``) runs
without FLARE; ``executor`` is the thin NVIDIA FLARE layer over it.
"""

__version__ = "0.1.0"
