"""Training: exit losses and checkpoints (backend-neutral); `tf_*` modules need TensorFlow."""
