"""chestct: chest CT cancer detection, from the Kaggle dataset to a served model.

Importing the package sets TensorFlow's runtime options, so it must come before the first TensorFlow import
(every stage, the CLI, the service and the tests import chestct first).

oneDNN: TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX512 neural-network extensions.
On others (this project's AVX2 CI and dev machines) they are off, and DenseNet121's phase-1 training step runs
about 1.3x slower without them (benchmarks/epoch_time.py). oneDNN changes results only by floating-point
rounding; runs stay reproducible as long as the setting is the same, which is why it is set here, for every
entry point alike. Set TF_ENABLE_ONEDNN_OPTS=0 in the environment to opt out.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
