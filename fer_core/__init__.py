"""fer_core: the library of fer-bias-study (data, synthetic faces, models, training, metrics, fairness).

It knows nothing about Ray; the orchestration lives in :mod:`study`.
"""

__version__ = "0.1.0"
