"""Model names that light modules (configs, CLI help) need without importing torch."""

DEFAULT_MODEL = "isg-10-2"  # the paper's best: the default of create_model, TrainConfig and `isg train --model`
