"""SASRec in Keras 3: model, training, evaluation, export and batch recommendation.

Importing this package is cheap; Keras and TensorFlow load when a submodule that needs them is used.
"""

__version__ = "0.1.0"
