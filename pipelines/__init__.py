"""Data pipeline: raw interaction logs -> clean events -> per-user sequences -> dataset folder.

pandas, pyarrow and numpy only: nothing here imports TensorFlow or Keras.
"""

PIPELINE_VERSION = "1"
