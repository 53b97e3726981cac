"""Training studio core: usable from scripts without the UI.

    import core
    settings = core.load_settings("training.json")
    settings.model.architecture = "sdxl"
    result = core.train(settings, on_event=print)
"""
from core.events import RunFailed, SaveFailed, TrainingDiverged
from core.settings import Settings, SettingsError, load_settings, save_settings
from core.kohya_import import import_kohya

__all__ = ["Settings", "SettingsError", "RunFailed", "SaveFailed", "TrainingDiverged", "load_settings", "save_settings", "train", "TrainResult", "import_kohya"]


def __getattr__(name):
    # the trainer pulls in torch and diffusers; importing core for the settings alone stays fast
    if name in ("train", "TrainResult"):
        from core import trainer
        return getattr(trainer, name)
    raise AttributeError(name)
