"""The product a scheduler uses: features, training, the saved model and its load/predict path, the embedding.

Imports only `estimator.data` and `estimator.errors`; never the study, the report, matplotlib or scikit-learn
at import time.
"""
