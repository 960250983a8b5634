"""The errors of knetlab.models, in a module of their own so that every model module can raise them without
importing another (they are re-exported by `knetlab.models`, `backbones` and `convert` as before)."""


class ModelError(ValueError):
    """A model name, option, input or weight file that the model zoo cannot use; the message names it."""


class ConversionError(ModelError):
    """A checkpoint that does not convert onto the model; the message names the offending keys."""


class PretrainedError(ModelError):
    """Pretrained backbone weights that cannot be fetched, fail their checksum or do not fit the backbone; the
    message names them (re-exported by `knetlab.models.pretrained`)."""
