"""The Prefect train task's multi-GPU launch: the library's `accelerate launch` of the train stage
(flux2lora.launch), its output streamed into the task run's log."""

from flux2lora.launch import LaunchFailed, accelerate_command, launch_train, launched, stream  # noqa: F401
