"""The model and its training: backbone registry, custom layers, losses, augmentation, tf.data, the loop."""
