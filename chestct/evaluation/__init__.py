"""Clinical metrics, the threshold choice, the shortcut audit, Grad-CAM and the evaluation plots."""
