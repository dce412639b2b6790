"""Where the Python API starts (kept for users: the code lives in :mod:`advseg.train.trained`)."""

from advseg.train.trained import Trained, checkpoint_label, load_trained, trained_data_config

__all__ = ["Trained", "checkpoint_label", "load_trained", "trained_data_config"]
