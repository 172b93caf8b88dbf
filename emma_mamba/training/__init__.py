"""Two-stage training of EMMA-Mamba: config (:mod:`.config`), loop (:mod:`.trainer`), DDP/FSDP2 wrapping
(:mod:`.parallel`), optimizer and schedule (:mod:`.optim`), checkpoints (:mod:`.checkpoint`) and the
``emma-mamba pretrain`` / ``emma-mamba finetune`` commands (:mod:`.cli_train`)."""


class TrainingError(RuntimeError):
    """A run that cannot go on, with one message naming why and where (a checkpoint that cannot be read or does
    not fit this run, a non-finite loss); ``emma-mamba pretrain|finetune`` prints it without a traceback."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C (SIGINT) during the steps, or SIGTERM (a scheduler's stop: the run checkpoints after the step it is
    in first); the message says where the run stopped and what it can resume from. ``exit_code``: 128 + the
    signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process the signal ended."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
