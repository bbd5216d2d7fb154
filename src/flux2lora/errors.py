"""Errors a user can cause (and fix): bad params, a missing model, a device that is not there, a damaged cache
entry, a destination that refuses a publish.

Each message names the file or key at fault and what to do. The command line prints it without a traceback and
exits with code 2 (`--debug`, or FLUX2LORA_DEBUG=1, shows the traceback); the Prefect tasks do not retry a
`permanent` one, since every attempt would end the same way.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user fixes by editing params, files or the environment; str(e) says which and how."""

    # False where simply running again can succeed (a damaged cache entry is re-encoded by the next run)
    permanent = True


class ModelNotFound(UserError, FileNotFoundError):
    """`model.pretrained_model_name_or_path` is neither a loadable local folder nor a reachable Hub model."""


class DeviceUnavailable(UserError, RuntimeError):
    """`model.device` names an accelerator this machine does not have."""


class PublishFailed(UserError, RuntimeError):
    """S3 or the Hub refused or could not take a publish; nothing was registered."""

    def __init__(self, message: str, permanent: bool = True):
        super().__init__(message)
        self.permanent = permanent


class BaseModelRefused(UserError, ValueError):
    """The base model is not one to train on as configured (a step-distilled klein without model.allow_distilled)."""


class TextEncoderMismatch(UserError, ValueError):
    """The tokenizer or text encoder cannot serve the flavour: missing, incomplete or a different model."""
